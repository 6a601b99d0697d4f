//! A KVM VM over one guest RAM, whose memory slots cover only what the guest can reach.
//!
//! KVM allocates and zeroes per-page metadata for every slot when it is made (reverse maps
//! and write tracking, under shadow paging); one slot over a fork's whole 1 GiB RAM made
//! creating the VM cost about 0.85 ms, where a fork of the Python template reaches 128 MiB
//! of it. So the RAM is cut into chunks (`forkvm_memory::reach`): a new VM gets a slot for
//! each run of chunks its process's mappings touch, and a chunk the program reaches later
//! (a new mapping far from the others) gets its own slot before the vCPU runs again.

use std::collections::BTreeSet;

use forkvm_memory::ram::GuestRam;
use forkvm_memory::reach::SLOT_CHUNK;
use kvm_bindings::kvm_userspace_memory_region;
use kvm_ioctls::{Kvm, VmFd};

use crate::sandbox::{SandboxError, retry_interrupted};

/// A VM and the chunks of its RAM its memory slots cover.
pub(crate) struct Vm {
    fd: VmFd,
    /// Chunks given to KVM; a chunk's slot number is its index.
    registered: BTreeSet<u64>,
    /// The RAM's reach generation `registered` is current for.
    seen: Option<u64>,
}

impl Vm {
    /// Creates a VM over `ram` with slots for `populated` (the process's mappings, system
    /// area and page-table pool) and whatever else the RAM has noted as reachable.
    pub fn create(kvm: &Kvm, ram: &GuestRam, populated: &[(u64, u64)]) -> Result<Vm, SandboxError> {
        // The scheduler's and watchdog's timer signals may interrupt it; it is made again.
        let fd = retry_interrupted(|| kvm.create_vm()).map_err(SandboxError::CreateVm)?;
        for &(start, end) in populated {
            ram.note_reachable(start, end);
        }
        let mut vm = Vm {
            fd,
            registered: BTreeSet::new(),
            seen: None,
        };
        vm.cover(ram)?;
        Ok(vm)
    }

    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Bytes of guest RAM the slots cover.
    pub fn slot_bytes(&self) -> u64 {
        self.registered.len() as u64 * SLOT_CHUNK
    }

    /// Gives KVM a slot for every chunk of `ram` the guest can reach and KVM does not have
    /// yet; consecutive new chunks share one slot. One atomic load when nothing changed.
    pub fn cover(&mut self, ram: &GuestRam) -> Result<(), SandboxError> {
        if self.seen == Some(ram.reach().generation()) {
            return Ok(());
        }
        let (chunks, generation) = ram.reach().chunks();
        let new: Vec<u64> = chunks
            .into_iter()
            .filter(|c| !self.registered.contains(c))
            .collect();
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for chunk in new {
            match runs.last_mut() {
                Some((_, end)) if *end == chunk => *end += 1,
                _ => runs.push((chunk, chunk + 1)),
            }
        }
        for (first, end) in runs {
            let start = first * SLOT_CHUNK;
            let size = (end * SLOT_CHUNK).min(ram.size()) - start;
            let region = kvm_userspace_memory_region {
                slot: u32::try_from(first).map_err(|_| SandboxError::TooManySlots(first))?,
                flags: 0,
                guest_phys_addr: start,
                memory_size: size,
                userspace_addr: ram.host_base() + start,
            };
            // SAFETY: the region lies inside `ram`'s live host mapping (`start + size` is
            // at most its size). Every owner of a `Vm` keeps it beside the RAM's owner and
            // drops the VM first (Sandbox and PreparedVm field order), so the mapping
            // outlives the slot.
            unsafe { self.fd.set_user_memory_region(region) }
                .map_err(SandboxError::SetMemoryRegion)?;
            self.registered.extend(first..end);
        }
        self.seen = Some(generation);
        Ok(())
    }
}
