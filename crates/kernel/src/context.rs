//! A thread's user-mode CPU state, as the syscall layer sees and changes it.
//!
//! At every syscall the VMM hands the calling thread's registers over as a `UserContext` in
//! the form user mode sees after a `syscall` instruction (`rip` is the return address and
//! `rcx`/`r11` hold it and the flags, as Linux leaves them). The syscall layer sets `rax` and
//! may change anything else: `arch_prctl` sets the FS base, and switching threads replaces
//! the whole context with another thread's. The vector and x87 state (XSAVE image) is large
//! and rarely needed, so it moves only through `Fpu`, when a thread leaves or takes the vCPU.

use serde::{Deserialize, Serialize};

/// The general-purpose registers, instruction pointer and flags.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserRegs {
    pub rax: u64,
    pub rbx: u64,
    pub rcx: u64,
    pub rdx: u64,
    pub rsi: u64,
    pub rdi: u64,
    pub rsp: u64,
    pub rbp: u64,
    pub r8: u64,
    pub r9: u64,
    pub r10: u64,
    pub r11: u64,
    pub r12: u64,
    pub r13: u64,
    pub r14: u64,
    pub r15: u64,
    pub rip: u64,
    pub rflags: u64,
}

/// Everything of a thread's user-mode state except the vector registers.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UserContext {
    pub regs: UserRegs,
    pub fs_base: u64,
    pub gs_base: u64,
}

impl UserContext {
    /// The syscall being made: its number and six argument registers.
    pub fn syscall(&self) -> crate::SyscallArgs {
        let r = &self.regs;
        crate::SyscallArgs {
            nr: r.rax,
            args: [r.rdi, r.rsi, r.rdx, r.r10, r.r8, r.r9],
        }
    }
}

/// A thread's vector and x87 state: an XSAVE image in the layout the VMM's CPU uses. The
/// syscall layer stores and copies it without reading it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct FpuState(#[serde(with = "serde_bytes")] pub Vec<u8>);

/// The vCPU's vector state, which the syscall layer saves and loads when threads switch.
pub trait Fpu {
    /// The state of the thread on the vCPU now.
    fn save(&mut self) -> FpuState;
    /// Makes `state` the vCPU's. An image the CPU refuses (only a hostile program can make
    /// one, through a signal frame) is an error.
    fn load(&mut self, state: &FpuState) -> Result<(), FpuError>;
}

/// The CPU refused a vector-state image.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("the CPU refused the vector-state image")]
pub struct FpuError;

/// An `Fpu` for code that runs syscalls without a vCPU (tests, fuzzing): one state slot.
#[derive(Debug, Default)]
pub struct DetachedFpu {
    pub state: FpuState,
}

impl Fpu for DetachedFpu {
    fn save(&mut self) -> FpuState {
        self.state.clone()
    }

    fn load(&mut self, state: &FpuState) -> Result<(), FpuError> {
        self.state = state.clone();
        Ok(())
    }
}
