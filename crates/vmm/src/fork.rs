//! Forking a snapshot: a new VM whose memory is a private (copy-on-write) mapping of the
//! snapshot's memory file, whose vCPU is restored to the parked state, and whose process is
//! a clone of the snapshot's syscall-layer state.
//!
//! Preparing the VM (create VM and vCPU, map memory, restore registers) is the slow part
//! and needs nothing from the request, so `Pool` does it ahead of time; turning a
//! prepared VM into a runnable sandbox only clones the process state.

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use forkvm_image::Image;
use forkvm_kernel::procs::Pid;
use forkvm_kernel::{Console, Input, OtherMemory, Process, ProcessState};
use forkvm_memory::backing::Backing;
use forkvm_memory::ram::GuestRam;
use kvm_ioctls::VcpuFd;

use crate::sandbox::SandboxError;
use crate::vcpu::VcpuState;
use crate::vm::Vm;
use crate::{RunResult, Sandbox, Vmm, VmmError};

/// How long a warm-up request may run.
const WARMUP_TIMEOUT: Duration = Duration::from_secs(10);

/// Everything the forks of one snapshot start from.
pub struct ForkSource {
    /// The snapshot's guest memory: files the size of guest RAM (sparse), never written.
    pub backing: Backing,
    pub vcpu: VcpuState,
    pub process: ProcessState,
    pub image: Arc<Image>,
    /// The memory of the snapshot's other processes and shared segments.
    pub others: OtherSources,
    /// The pages a fork's first request writes, once known (`Vmm::learn_writes`, or the
    /// pool's first warm-up): see `prepare_fork`.
    pub first_writes: OnceLock<Vec<(u64, u64)>>,
}

/// What the other processes of a snapshot (beyond the first) start from: each one's guest
/// memory, and the bytes of each shared memory segment (never written; a fork gets copies).
#[derive(Default, Clone)]
pub struct OtherSources {
    pub memories: BTreeMap<Pid, Backing>,
    pub segments: BTreeMap<u64, Arc<File>>,
}

impl OtherSources {
    /// Fresh memory for a fork's other processes, and its segments (which the fork copies
    /// only if it may write them).
    fn instantiate(&self, process: &ProcessState) -> Result<OtherMemory, VmmError> {
        let mut memory = OtherMemory::default();
        for (&pid, backing) in &self.memories {
            let ram = GuestRam::from_backing(backing, process.ram_size())?;
            memory.rams.insert(pid, ram);
        }
        memory.segments = self.segments.clone();
        Ok(memory)
    }
}

impl ForkSource {
    /// Guest RAM size of every fork.
    pub fn ram_size(&self) -> u64 {
        self.process.ram_size()
    }

    /// Bytes of memory a snapshot of a fork (`Vmm::snapshot_fork`) added: each process's
    /// top layer (or, flattened, its new base file) and the segments' copies.
    pub fn added_bytes(&self) -> u64 {
        let allocated = |file: &File| {
            use std::os::unix::fs::MetadataExt;
            file.metadata().map_or(0, |m| m.blocks() * 512)
        };
        let of = |backing: &Backing| match backing.layers.last() {
            Some(layer) => layer.ranges.iter().map(|(s, e)| e - s).sum(),
            None => allocated(&backing.base),
        };
        let memories: u64 = self.others.memories.values().map(of).sum();
        let segments: u64 = self.others.segments.values().map(|f| allocated(f)).sum();
        of(&self.backing) + memories + segments
    }
}

/// A VM ready to become a fork: memory slot over a fresh private mapping of the snapshot,
/// vCPU restored. Field order is drop order: vCPU and VM before the RAM they refer to.
pub struct PreparedVm {
    vcpu: VcpuFd,
    vm: Vm,
    ram: GuestRam,
}

impl PreparedVm {
    /// The prepared VM's guest RAM.
    pub fn ram(&self) -> &GuestRam {
        &self.ram
    }

    /// Bytes of guest RAM KVM's memory slots cover (see `vm`).
    pub fn slot_bytes(&self) -> u64 {
        self.vm.slot_bytes()
    }
}

impl Vmm {
    /// Does the slow half of a fork, off the request path.
    ///
    /// The pages the first request will write are copied from the snapshot first, in one
    /// call and before the VM exists. Left to the guest, a page it reads and then writes
    /// costs three shadow faults: the read maps the snapshot's page read-only; the write
    /// copies it on the host, whose MMU notifier then makes KVM drop (and flush) the
    /// read-only mapping, so the write faults once more. Copied ahead, it costs one.
    pub fn prepare_fork(&self, source: &ForkSource) -> Result<PreparedVm, VmmError> {
        let ram = GuestRam::from_backing(&source.backing, source.ram_size())?;
        for &(start, end) in source.first_writes.get().into_iter().flatten() {
            ram.populate(start, end - start);
        }
        let vm = Vm::create(self.kvm(), &ram, &source.process.populated_ranges())?;
        let vcpu = vm.fd().create_vcpu(0).map_err(SandboxError::CreateVcpu)?;
        source
            .vcpu
            .restore(&vcpu, self.cpu())
            .map_err(SandboxError::Vcpu)?;
        Ok(PreparedVm { vcpu, vm, ram })
    }

    /// Runs `warmup` (a request frame of our own) in a prepared VM, then resets memory and
    /// vCPU to the snapshot. KVM's shadow page tables keep the pages the warm-up touched, and
    /// the pages it wrote stay private and writable, so the next request skips those faults.
    pub fn warm_up(
        &self,
        prepared: PreparedVm,
        source: &ForkSource,
        frame: &[u8],
    ) -> Result<PreparedVm, VmmError> {
        let console = Console::new(
            Input::Empty,
            Box::new(std::io::sink()),
            Box::new(std::io::sink()),
            1 << 20,
        );
        let mut sandbox = self.finish_fork(prepared, source, console)?;
        sandbox.process_mut().set_huge_pages(false);
        sandbox.deliver_request(frame)?;
        let deadline = Instant::now() + WARMUP_TIMEOUT;
        match sandbox.run_until_request(Some(deadline)) {
            RunResult::AwaitingRequest => {}
            RunResult::Ended(exit) => return Err(VmmError::Warmup(format!("{exit:?}"))),
        }
        let prepared = self
            .reset_fork(sandbox, source, u64::MAX)?
            .ok_or_else(|| VmmError::Warmup("the warm-up wrote too much memory".into()))?;
        // What stays private after the reset: not what the request wrote and then gave
        // back (freed arenas, temporary arrays), which the reset mapped from the snapshot.
        if source.first_writes.get().is_none() {
            let _ = source.first_writes.set(written_ranges(prepared.ram())?);
        }
        Ok(prepared)
    }

    /// Runs `frame` in a fork of `source` and records the pages it wrote as the ones every
    /// fork's first request writes (`prepare_fork` copies them ahead). For pools without a
    /// warm-up, whose first warm-up would otherwise teach it; once per source.
    pub fn learn_writes(&self, source: &ForkSource, frame: &[u8]) -> Result<(), VmmError> {
        if source.first_writes.get().is_some() {
            return Ok(());
        }
        let prepared = self.prepare_fork(source)?;
        self.warm_up(prepared, source, frame).map(drop)
    }

    /// Puts a fork of `source` back exactly as the snapshot was (memory byte-for-byte,
    /// registers) and returns its VM for another request, keeping KVM's shadow page tables
    /// warm. Returns `None` (and tears the VM down) when the fork made more than
    /// `max_private_bytes` of memory its own: keeping that much resident for reuse is not
    /// worth it. The caller decides who may get the VM next (see `forkvm_engine::recycle`).
    pub fn reset_fork(
        &self,
        sandbox: Sandbox,
        source: &ForkSource,
        max_private_bytes: u64,
    ) -> Result<Option<PreparedVm>, VmmError> {
        let (vm, vcpu, process) = sandbox.into_parts();
        let ram = process.into_ram();
        let private = ram.reachable_private_pages()?;
        if (private.len() as u64).saturating_mul(forkvm_memory::ram::PAGE_SIZE) > max_private_bytes
        {
            return Ok(None);
        }
        ram.reset_with(&source.backing, &private)?;
        source
            .vcpu
            .restore_registers(&vcpu)
            .map_err(SandboxError::Vcpu)?;
        Ok(Some(PreparedVm { vcpu, vm, ram }))
    }

    /// Turns a prepared VM into a sandbox parked where the snapshot was taken, with fresh
    /// standard streams.
    pub fn finish_fork(
        &self,
        prepared: PreparedVm,
        source: &ForkSource,
        console: Console,
    ) -> Result<Sandbox, VmmError> {
        let PreparedVm { vcpu, vm, ram } = prepared;
        let others = source.others.instantiate(&source.process)?;
        let process = Process::from_state(
            ram,
            source.image.clone(),
            source.process.clone(),
            console,
            others,
        )
        .map_err(VmmError::Process)?;
        Ok(Sandbox::from_restored(
            self.kvm(),
            vm,
            vcpu,
            process,
            &source.vcpu,
            self.cpu(),
        ))
    }
}

/// The private (written) pages of `ram`, as merged ranges.
fn written_ranges(ram: &GuestRam) -> Result<Vec<(u64, u64)>, VmmError> {
    let pages = ram.reachable_private_pages()?;
    let page = forkvm_memory::ram::PAGE_SIZE;
    Ok(forkvm_memory::backing::merge_ranges(
        pages.into_iter().map(|p| (p, p + page)).collect(),
    ))
}
