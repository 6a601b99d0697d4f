//! The KVM side of a forkvm sandbox.
//!
//! `/dev/kvm` on our machines is kvm_pvm: guest ring 3 runs at native speed, guest ring 0 is
//! emulated thousands of times slower. So a sandbox has no guest kernel: the program runs in
//! ring 3, and ring 0 holds only two-instruction stubs that turn `syscall` and CPU exceptions
//! into exits to this VMM, where `forkvm_kernel` serves them.

pub mod descriptors;
pub mod exit;
pub mod fork;
pub mod layer;
pub mod layout;
pub mod paging;
pub mod pool;
pub mod sandbox;
pub mod stats;
pub mod suspend;
pub mod tsc;
pub mod vcpu;
pub(crate) mod vm;
pub mod watchdog;

use forkvm_memory::ram::{GuestRam, MemoryError};
use std::sync::Arc;

use kvm_ioctls::Kvm;
use thiserror::Error;

pub use exit::{Fault, SandboxExit};
pub use fork::{ForkSource, OtherSources, PreparedVm};
pub use pool::{Pool, PoolConfig, PoolStats};
pub use sandbox::{Parked, RunResult, Sandbox, SandboxError};
pub use vcpu::{CpuTemplate, VcpuState};
pub use watchdog::Cancel;

/// Errors while setting up the VMM or a sandbox's memory.
#[derive(Debug, Error)]
pub enum VmmError {
    #[error("opening /dev/kvm: {0} (is KVM available and are you allowed to use it?)")]
    OpenKvm(kvm_ioctls::Error),
    #[error("reading the host CPU features: {0}")]
    Cpu(#[from] vcpu::VcpuSetupError),
    #[error("guest RAM size {size} must be a multiple of 2 MiB between 64 MiB and {max} bytes")]
    RamSize { size: u64, max: u64 },
    #[error("allocating guest RAM: {0}")]
    Ram(#[from] MemoryError),
    #[error("writing page tables and descriptors: {0}")]
    SystemArea(#[from] forkvm_memory::ram::OutOfBounds),
    #[error(transparent)]
    Sandbox(#[from] SandboxError),
    #[error("restoring the process state: {0}")]
    Process(forkvm_kernel::SpawnError),
    #[error("starting the program: {0}")]
    Spawn(forkvm_kernel::SpawnError),
    #[error("the warm-up request did not come back to the agent: {0}")]
    Warmup(String),
}

/// A program to start in a new sandbox (`Vmm::spawn`).
pub struct Program {
    /// Path of the program inside the sandbox filesystem.
    pub path: Vec<u8>,
    pub argv: Vec<Vec<u8>>,
    pub envp: Vec<Vec<u8>>,
    /// Absolute working directory.
    pub cwd: Vec<u8>,
    /// Guest RAM, which is also the program's memory limit.
    pub ram_bytes: u64,
    pub fs: forkvm_image::Fs,
    pub console: forkvm_kernel::Console,
    /// Opens the control channel on descriptor 3 (a template's agent).
    pub control_channel: bool,
}

/// Smallest guest RAM we accept (the stack alone takes 8 MiB, python3 tens more).
pub const MIN_RAM: u64 = 64 << 20;

/// The process-wide KVM handle and the CPU features every sandbox gets.
pub struct Vmm {
    kvm: Arc<Kvm>,
    cpu: CpuTemplate,
}

/// Allocates sparse guest RAM of `size` bytes holding the page tables, descriptor tables
/// and stubs; the program's memory is still all zero.
pub fn new_ram(size: u64) -> Result<GuestRam, VmmError> {
    if !(MIN_RAM..=layout::MAX_RAM).contains(&size) || !size.is_multiple_of(layout::RAM_ALIGN) {
        return Err(VmmError::RamSize {
            size,
            max: layout::MAX_RAM,
        });
    }
    let ram = GuestRam::anonymous(size)?;
    paging::build_system_area(&ram)?;
    descriptors::install(&ram)?;
    Ok(ram)
}

/// Fresh guest RAM for the syscall layer (`execve`).
pub struct SystemArea;

impl forkvm_kernel::Machine for SystemArea {
    fn fresh_ram(&self, size: u64) -> Result<GuestRam, String> {
        new_ram(size).map_err(|e| e.to_string())
    }
}

impl Vmm {
    /// Opens `/dev/kvm` and reads the host CPU features.
    pub fn new() -> Result<Self, VmmError> {
        let kvm = Kvm::new().map_err(VmmError::OpenKvm)?;
        let cpu = CpuTemplate::from_host(&kvm)?;
        Ok(Self {
            kvm: Arc::new(kvm),
            cpu,
        })
    }

    pub fn kvm(&self) -> &Arc<Kvm> {
        &self.kvm
    }

    pub fn cpu(&self) -> &CpuTemplate {
        &self.cpu
    }

    /// Allocates sparse guest RAM of `size` bytes holding the page tables, descriptor tables
    /// and stubs; the program's memory is still all zero.
    pub fn new_ram(&self, size: u64) -> Result<GuestRam, VmmError> {
        new_ram(size)
    }

    /// The one way to start a program in a new sandbox: fresh guest RAM with its system
    /// area, the program loaded with its interpreter and initial stack, and its VM and
    /// vCPU, ready to run.
    pub fn spawn(&self, program: Program) -> Result<Sandbox, VmmError> {
        let ram = self.new_ram(program.ram_bytes)?;
        let config = forkvm_kernel::SpawnConfig {
            program: program.path,
            argv: program.argv,
            envp: program.envp,
            cwd: program.cwd,
            limits: forkvm_kernel::Limits {
                memory_bytes: program.ram_bytes,
                ..forkvm_kernel::Limits::default()
            },
            user_start: layout::USER_START,
        };
        let (mut process, entry) =
            forkvm_kernel::Process::spawn(ram, program.fs, program.console, config)
                .map_err(VmmError::Spawn)?;
        if program.control_channel {
            process.open_control_channel().map_err(VmmError::Spawn)?;
        }
        self.sandbox(process, entry)
    }

    /// Creates the VM and vCPU for a loaded process.
    pub fn sandbox(
        &self,
        process: forkvm_kernel::Process,
        entry: forkvm_kernel::Entry,
    ) -> Result<Sandbox, VmmError> {
        Ok(Sandbox::new(&self.kvm, &self.cpu, process, entry)?)
    }
}
