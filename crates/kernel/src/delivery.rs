//! Delivering signals: the `rt_sigframe` a handler runs on, and `rt_sigreturn`, which
//! resumes the thread from it.
//!
//! Each time a thread returns to user mode (after a syscall, a switch, or an interrupt),
//! its deliverable signals are looked at: ignored ones are dropped, fatal ones end the
//! sandbox, and the first one with a handler gets a frame, laid out as Linux lays it out
//! on x86-64 (glibc's `ucontext_t` and tools that read `uc_mcontext` depend on it): the
//! saved registers, mask and alternate stack in a `ucontext`, the `siginfo`, and the vector
//! state (an XSAVE image with Linux's magic words) above them, 64-byte aligned. The handler
//! returns through `sa_restorer` into `rt_sigreturn`, which restores all of it. Everything
//! read back from the frame is the program's to choose; it can only change its own thread.

use std::mem::{offset_of, size_of};

use syscalls::Errno;
use vm_memory::ByteValued;

use crate::abi::{StackT, from_prefix};
use crate::context::{Fpu, FpuState, UserContext};
use crate::process::Process;
use crate::signals::{Disposition, SigAction, SigInfo, UNBLOCKABLE, bit, next_signal};
use crate::syscalls::ExitReason;
use crate::threads::{AltStack, SignalWake};

/// Bytes of vector state a frame holds: the XSAVE image as the VMM's CPU keeps it.
pub const FPU_FRAME_BYTES: u64 = 4096;
/// Stack a signal frame needs (`AT_MINSIGSTKSZ`): the frame, the vector state, alignment.
pub const MIN_SIGNAL_STACK: u64 = 5120;

const SA_ONSTACK: u64 = 0x0800_0000;
const SA_RESTART: u64 = 0x1000_0000;
const SA_NODEFER: u64 = 0x4000_0000;
const SA_RESETHAND: u64 = 0x8000_0000;
const SA_RESTORER: u64 = 0x0400_0000;

/// `uc_flags`: the frame has extended state, and the saved `ss` is to be used as is.
const UC_FLAGS: u64 = 0x1 | 0x2 | 0x4;
/// Linux's markers that an XSAVE image follows the legacy FXSAVE area.
const FP_XSTATE_MAGIC1: u32 = 0x4650_5853;
const FP_XSTATE_MAGIC2: u32 = 0x4650_5845;
/// Where the FXSAVE area's software-reserved bytes (`struct _fpx_sw_bytes`) start.
const FPX_SW_BYTES: usize = 464;
/// Where the XSAVE header, and its first word (the features saved), starts.
const XSAVE_HEADER: usize = 512;
/// The selectors user mode runs with under Linux (the frame shows these, not ours).
const USER_CS: u16 = 0x33;
const USER_DS: u16 = 0x2b;
/// Flags a handler starts with cleared: trap, direction, resume.
const CLEARED_FLAGS: u64 = (1 << 8) | (1 << 10) | (1 << 16);

/// `struct sigcontext` (64-bit).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct SigContext {
    r8: u64,
    r9: u64,
    r10: u64,
    r11: u64,
    r12: u64,
    r13: u64,
    r14: u64,
    r15: u64,
    rdi: u64,
    rsi: u64,
    rbp: u64,
    rbx: u64,
    rdx: u64,
    rax: u64,
    rcx: u64,
    rsp: u64,
    rip: u64,
    eflags: u64,
    cs: u16,
    gs: u16,
    fs: u16,
    ss: u16,
    err: u64,
    trapno: u64,
    oldmask: u64,
    cr2: u64,
    fpstate: u64,
    reserved: [u64; 8],
}

/// The kernel's `struct ucontext` (glibc's `ucontext_t` begins the same way).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct UContext {
    flags: u64,
    link: u64,
    stack: StackT,
    mcontext: SigContext,
    sigmask: u64,
}

/// `struct _fpx_sw_bytes`: what Linux keeps in the FXSAVE area's unused tail.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct FpxSwBytes {
    magic1: u32,
    extended_size: u32,
    xfeatures: u64,
    xstate_size: u32,
    padding: [u32; 7],
}

/// `struct rt_sigframe`: the return address (`sa_restorer`), the context, the siginfo.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct RtSigFrame {
    pretcode: u64,
    uc: UContext,
    info: SigInfo,
}

// SAFETY: each is `repr(C)` and made only of integers (and `SigInfo` and `StackT`, themselves
// `ByteValued`), with the sizes and offsets below, so there is no padding and every byte
// pattern is valid.
unsafe impl ByteValued for SigContext {}
// SAFETY: as above.
unsafe impl ByteValued for UContext {}
// SAFETY: as above.
unsafe impl ByteValued for FpxSwBytes {}
// SAFETY: as above.
unsafe impl ByteValued for RtSigFrame {}

const _: () = {
    assert!(size_of::<SigContext>() == 256);
    assert!(offset_of!(SigContext, cs) == 144);
    assert!(offset_of!(SigContext, fpstate) == 184);
    assert!(offset_of!(UContext, mcontext) == 40);
    assert!(offset_of!(UContext, sigmask) == 296);
    assert!(size_of::<UContext>() == 304);
    assert!(offset_of!(RtSigFrame, info) == 312);
    assert!(size_of::<RtSigFrame>() == 440);
    assert!(size_of::<FpxSwBytes>() == 48);
    assert!(FPX_SW_BYTES + size_of::<FpxSwBytes>() == XSAVE_HEADER);
};

impl Process {
    /// The current thread's next deliverable signal, taken off its pending set or the
    /// process's.
    fn take_deliverable(&mut self) -> Option<SigInfo> {
        let candidates = (self.threads.current_pending() | self.signals.pending.set())
            & !self.threads.current_mask();
        let signal = next_signal(candidates)?;
        self.threads
            .take_current_pending(signal)
            .or_else(|| self.signals.pending.take(signal))
    }

    /// The current thread is about to return to user mode with `ctx`: drops its ignored
    /// signals, ends the sandbox for a fatal one, or sets up the frame of the first with a
    /// handler. `interrupted` says a signal woke it from a syscall, which is then made again
    /// or fails with `EINTR`. Returns whether `ctx` changed.
    pub(crate) fn deliver_signals(
        &mut self,
        ctx: &mut UserContext,
        fpu: &mut dyn Fpu,
        mut interrupted: Option<SignalWake>,
    ) -> Result<bool, ExitReason> {
        while let Some(info) = self.take_deliverable() {
            match self.signals.disposition(info.signo) {
                Disposition::Ignore => {}
                Disposition::Terminate => return Err(ExitReason::Signaled(info.signo)),
                Disposition::Handle(action) => {
                    match interrupted.take() {
                        Some(SignalWake::Restart) if action.flags & SA_RESTART != 0 => {
                            restart_syscall(ctx);
                        }
                        Some(_) => ctx.regs.rax = (-i64::from(Errno::EINTR.into_raw())) as u64,
                        None => {}
                    }
                    self.setup_frame(ctx, fpu, info, action)
                        .map_err(|_| ExitReason::Signaled(libc::SIGSEGV))?;
                    return Ok(true);
                }
            }
        }
        self.threads.restore_saved_mask();
        // Woken, but no handler ran (the signal went to another thread, or was ignored):
        // the syscall is made again.
        if interrupted.is_some() {
            restart_syscall(ctx);
            return Ok(true);
        }
        Ok(false)
    }

    /// Writes the frame for `info` on the thread's stack (or alternate stack) and points
    /// `ctx` at the handler.
    fn setup_frame(
        &mut self,
        ctx: &mut UserContext,
        fpu: &mut dyn Fpu,
        info: SigInfo,
        action: SigAction,
    ) -> Result<(), Errno> {
        let signal = info.signo;
        if action.flags & SA_RESTORER == 0 {
            return Err(Errno::EFAULT);
        }
        let alt = self.threads.alt_stack();
        let on_alt = alt.contains(ctx.regs.rsp);
        // Below the interrupted code's red zone, or at the top of the alternate stack.
        let mut sp = ctx.regs.rsp.wrapping_sub(128);
        let use_alt = action.flags & SA_ONSTACK != 0 && alt.flags & libc::SS_DISABLE == 0;
        if use_alt && !on_alt {
            sp = alt.sp.wrapping_add(alt.size);
        }
        let fpu_addr = sp.wrapping_sub(FPU_FRAME_BYTES + 4) & !63;
        let frame_addr =
            (fpu_addr.wrapping_sub(size_of::<RtSigFrame>() as u64) & !15).wrapping_sub(8);
        if use_alt && frame_addr < alt.sp {
            // The alternate stack is too small for the frame.
            return Err(Errno::EFAULT);
        }
        self.check_user(frame_addr, fpu_addr + FPU_FRAME_BYTES + 4 - frame_addr)?;

        let old_mask = self
            .threads
            .take_saved_mask()
            .unwrap_or_else(|| self.threads.current_mask());
        let r = &ctx.regs;
        let fault = matches!(signal, libc::SIGSEGV | libc::SIGBUS);
        let frame = RtSigFrame {
            pretcode: action.restorer,
            uc: UContext {
                flags: UC_FLAGS,
                link: 0,
                stack: StackT {
                    ss_sp: alt.sp,
                    ss_flags: alt.flags | if on_alt { libc::SS_ONSTACK } else { 0 },
                    pad: 0,
                    ss_size: alt.size,
                },
                mcontext: SigContext {
                    r8: r.r8,
                    r9: r.r9,
                    r10: r.r10,
                    r11: r.r11,
                    r12: r.r12,
                    r13: r.r13,
                    r14: r.r14,
                    r15: r.r15,
                    rdi: r.rdi,
                    rsi: r.rsi,
                    rbp: r.rbp,
                    rbx: r.rbx,
                    rdx: r.rdx,
                    rax: r.rax,
                    rcx: r.rcx,
                    rsp: r.rsp,
                    rip: r.rip,
                    eflags: r.rflags,
                    cs: USER_CS,
                    ss: USER_DS,
                    oldmask: old_mask,
                    cr2: if fault { info.fields[0] } else { 0 },
                    fpstate: fpu_addr,
                    ..SigContext::default()
                },
                sigmask: old_mask,
            },
            info,
        };
        self.write_user(fpu_addr, &fpu_frame_bytes(&fpu.save()))?;
        self.write_obj(frame_addr, &frame)?;

        let mut mask = old_mask | action.mask;
        if action.flags & SA_NODEFER == 0 {
            mask |= bit(signal);
        }
        self.threads.set_current_mask(mask & !UNBLOCKABLE);
        if action.flags & SA_RESETHAND != 0 {
            self.signals.actions[signal as usize - 1] = SigAction::default();
        }
        let regs = &mut ctx.regs;
        regs.rsp = frame_addr;
        regs.rip = action.handler;
        regs.rdi = signal as u64;
        regs.rsi = frame_addr + offset_of!(RtSigFrame, info) as u64;
        regs.rdx = frame_addr + offset_of!(RtSigFrame, uc) as u64;
        regs.rax = 0;
        // Handlers without SA_SIGINFO get the same registers and ignore the last two.
        regs.rflags &= !CLEARED_FLAGS;
        Ok(())
    }

    /// `rt_sigreturn`: resumes the thread as its handler's frame says (registers, mask,
    /// alternate stack, vector state). The frame is below `rsp` by the return address the
    /// handler's `ret` popped. A frame that cannot be read or a vector state the CPU refuses
    /// is fatal, as on Linux.
    pub(crate) fn sys_rt_sigreturn(
        &mut self,
        ctx: &mut UserContext,
        fpu: &mut dyn Fpu,
    ) -> Result<(), ExitReason> {
        let segv = |_| ExitReason::Signaled(libc::SIGSEGV);
        let frame_addr = ctx.regs.rsp.wrapping_sub(8);
        let frame: RtSigFrame = self.read_obj(frame_addr).map_err(segv)?;
        let m = &frame.uc.mcontext;
        ctx.regs = crate::context::UserRegs {
            r8: m.r8,
            r9: m.r9,
            r10: m.r10,
            r11: m.r11,
            r12: m.r12,
            r13: m.r13,
            r14: m.r14,
            r15: m.r15,
            rdi: m.rdi,
            rsi: m.rsi,
            rbp: m.rbp,
            rbx: m.rbx,
            rdx: m.rdx,
            rax: m.rax,
            rcx: m.rcx,
            rsp: m.rsp,
            rip: m.rip,
            rflags: m.eflags,
        };
        self.threads
            .set_current_mask(frame.uc.sigmask & !UNBLOCKABLE);
        let stack = frame.uc.stack;
        let requested = AltStack {
            sp: stack.ss_sp,
            flags: stack.ss_flags & libc::SS_DISABLE,
            size: stack.ss_size,
        };
        // As Linux's restore_altstack: a stack that could not be set is left as it is.
        if requested.flags & libc::SS_DISABLE != 0 || requested.size >= MIN_SIGNAL_STACK {
            self.threads.set_alt_stack(requested);
        }
        if m.fpstate != 0 {
            let image = self
                .read_user(m.fpstate, FPU_FRAME_BYTES as usize)
                .map_err(segv)?;
            fpu.load(&FpuState(image))
                .map_err(|_| ExitReason::Signaled(libc::SIGSEGV))?;
        }
        Ok(())
    }

    /// A CPU fault in the running thread (the VMM's exception exit): the thread's handler
    /// for `signal` runs if it has one and does not block it; otherwise the fault ends the
    /// sandbox, as Linux's forced signals do.
    pub fn deliver_fault(
        &mut self,
        ctx: &mut UserContext,
        fpu: &mut dyn Fpu,
        signal: i32,
        code: i32,
        addr: u64,
    ) -> crate::Outcome {
        let blocked = self.threads.current_mask() & bit(signal) != 0;
        let outcome =
            if blocked || !matches!(self.signals.disposition(signal), Disposition::Handle(_)) {
                crate::Outcome::Exit(ExitReason::Signaled(signal))
            } else {
                let tid = self.threads.current();
                self.threads
                    .signal_thread(tid, SigInfo::fault(signal, code, addr));
                match self.deliver_signals(ctx, fpu, None) {
                    Ok(_) => crate::Outcome::Switched,
                    Err(reason) => crate::Outcome::Exit(reason),
                }
            };
        // A process other than the first dies alone; the VMM reports the first's fault.
        self.settle(outcome)
    }
}

/// Back to the `syscall` instruction (2 bytes), with its number in `rax` again.
fn restart_syscall(ctx: &mut UserContext) {
    ctx.regs.rip = ctx.regs.rip.wrapping_sub(2);
}

/// The vector state as a frame stores it: the image, `FPU_FRAME_BYTES` long, with Linux's
/// software bytes in the FXSAVE area and its end marker after it.
fn fpu_frame_bytes(state: &FpuState) -> Vec<u8> {
    let mut bytes = state.0.clone();
    bytes.resize(FPU_FRAME_BYTES as usize, 0);
    let features: u64 = from_prefix(&bytes[XSAVE_HEADER..]);
    // The padding keeps whatever the image had there.
    let place = FPX_SW_BYTES..XSAVE_HEADER;
    let mut sw: FpxSwBytes = from_prefix(&bytes[place.clone()]);
    sw.magic1 = FP_XSTATE_MAGIC1;
    sw.extended_size = (FPU_FRAME_BYTES + 4) as u32;
    sw.xfeatures = features | 0x3;
    sw.xstate_size = FPU_FRAME_BYTES as u32;
    bytes[place].copy_from_slice(sw.as_slice());
    bytes.extend_from_slice(FP_XSTATE_MAGIC2.as_slice());
    bytes
}
