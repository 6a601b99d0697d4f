//! forkvm's Linux: the x86-64 system-call layer that sandboxed programs run on.
//!
//! A forkvm sandbox has no guest kernel. The program (Debian's `python3`, its `ld.so`, glibc,
//! numpy's shared objects, all unmodified) runs in guest ring 3, and every `syscall` it makes
//! exits to the VMM, which hands it to [`Process::handle_syscall`] here. This crate owns
//! everything a kernel would: the address space, the ELF loader and initial stack, the file
//! descriptor table over the layered image filesystem, signal dispositions, clocks and
//! entropy. It contains no KVM code and is unit-tested on any host.
//!
//! Every pointer and length the program passes is checked against its address space before
//! use (`EFAULT` otherwise), and every buffer is bounded: a hostile program can only end its
//! own sandbox.

pub(crate) mod abi;
pub mod between;
pub mod console;
pub mod context;
pub mod control;
pub mod delivery;
pub mod entropy;
pub mod errno;
pub mod fdtable;
pub mod file;
pub mod fileinfo;
pub mod high;
pub mod host_ops;
pub mod loader;
pub(crate) mod memory_budget;
pub mod mm;
pub mod net;
pub mod notify;
pub mod pagetable;
pub mod pipe;
pub mod process;
pub mod procfs;
pub mod procs;
pub mod procs_state;
mod proctree;
pub mod readiness;
pub(crate) mod shm;
pub mod signals;
pub mod slab;
mod spans;
pub mod stack;
pub mod stats;
mod strace;
mod switch;
pub mod syscalls;
pub mod threads;
pub mod timers;
pub mod vdso;

pub use console::{CaptureBuffer, Console, Input, OutputLimitReached};
pub use context::{DetachedFpu, Fpu, FpuError, FpuState, UserContext, UserRegs};
pub use loader::{Entry, SpawnConfig, SpawnError};
pub use process::{Limits, Machine, Process, ProcessState};
pub use procs_state::{CaptureError, OtherMemory};
pub use syscalls::{ExitReason, Outcome, SyscallArgs, syscall_name};
