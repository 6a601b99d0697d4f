//! What a snapshot keeps of a sandbox's processes beyond the first one's fields: the process
//! table, every other process's own state and memory layout, and the shared memory
//! segments; and the rebuilding of all of it in a fork.
//!
//! Memory *contents* are not here: each process's guest RAM and each segment's bytes are
//! the VMM's to store (as layers over the template, or files of a template on disk), and
//! come back as `OtherMemory` when a fork is made. A snapshot is taken with the first
//! process current and parked on its control channel; every other process is parked in the
//! table with its threads' contexts saved, so only their vector state needs the VMM
//! (`Process::save_parked_fpu`).

use std::collections::BTreeMap;
use std::fs::File;
use std::sync::Arc;

use forkvm_image::NodeId;
use forkvm_memory::ram::GuestRam;
use serde::{Deserialize, Serialize};

use crate::context::FpuState;
use crate::loader::SpawnError;
use crate::mm::AddressSpace;
use crate::pagetable::PageTables;
use crate::process::Process;
use crate::procs::{Entry, INIT, Memory, Own, Parked, Pid};
use crate::shm::Segments;
use crate::vdso::VdsoPlacement;

/// The process table as a snapshot keeps it.
#[derive(Clone, Serialize, Deserialize)]
pub(crate) struct TableState {
    entries: BTreeMap<Pid, Entry>,
    others: Vec<OtherState>,
    segments: Vec<SegmentState>,
    next_segment: u64,
    /// `CLOCK_MONOTONIC` nanoseconds of the snapshotted sandbox's start (`/proc/uptime`,
    /// process start times in `/proc/[pid]/stat`).
    boot_ns: u64,
}

/// A process other than the first.
#[derive(Clone, Serialize, Deserialize)]
struct OtherState {
    pid: Pid,
    own: Own,
    /// Its memory's layout; none while it uses another process's memory (`vfork`).
    memory: Option<MemoryLayout>,
}

#[derive(Clone, Serialize, Deserialize)]
struct MemoryLayout {
    mm: AddressSpace,
    vdso: Option<VdsoPlacement>,
}

#[derive(Clone, Serialize, Deserialize)]
struct SegmentState {
    id: u64,
    size: u64,
    node: Option<NodeId>,
    /// Some process maps it writable.
    writable: bool,
}

/// The memory contents a fork's other processes and segments start from, which the VMM
/// rebuilds from what it stored: guest RAM for each process `ProcessState::memories`
/// names (the size of the first's), and the stored bytes of each segment
/// `ProcessState::segments` names (read only: see `shm` on frozen segments).
#[derive(Default)]
pub struct OtherMemory {
    pub rams: BTreeMap<Pid, GuestRam>,
    pub segments: BTreeMap<u64, Arc<File>>,
}

/// A parked process's memory, for a snapshot.
pub struct ParkedMemory<'a> {
    pub pid: Pid,
    pub ram: &'a GuestRam,
    pub populated: Vec<(u64, u64)>,
}

/// A snapshot cannot be taken now.
#[derive(Debug, thiserror::Error)]
pub enum CaptureError {
    #[error("process {0} is current, not the first process")]
    NotFirst(Pid),
    #[error(
        "process {0} is between vfork and execve, using its parent's memory: try again once it \
         has started its program"
    )]
    Spawning(Pid),
}

impl TableState {
    /// Non-first processes whose memory the snapshot stores.
    pub(crate) fn memories(&self) -> impl Iterator<Item = Pid> + '_ {
        self.others
            .iter()
            .filter(|o| o.memory.is_some())
            .map(|o| o.pid)
    }

    /// Segment ids and sizes.
    pub(crate) fn segments(&self) -> impl Iterator<Item = (u64, u64)> + '_ {
        self.segments.iter().map(|s| (s.id, s.size))
    }
}

impl Process {
    /// Checks that a snapshot can be taken, and moves each parked process's vector state
    /// out of its vCPU into its thread records: `save(host_base)` reads the vCPU of the VM
    /// over the RAM at that host address, if there is one.
    pub fn save_parked_fpu(
        &mut self,
        mut save: impl FnMut(u64) -> Option<FpuState>,
    ) -> Result<(), CaptureError> {
        if self.pid() != INIT {
            return Err(CaptureError::NotFirst(self.pid()));
        }
        if let Some((&pid, _)) = self
            .procs
            .entries
            .iter()
            .find(|(_, e)| e.borrows_from.is_some())
        {
            return Err(CaptureError::Spawning(pid));
        }
        for parked in self.procs.parked.values_mut() {
            let Some(memory) = &parked.memory else {
                continue;
            };
            let threads = &mut parked.own.threads;
            let (owner, alive) = threads.fpu_owner();
            if alive && let Some(state) = save(memory.ram.host_base()) {
                threads.store_fpu(owner, state);
                threads.set_fpu_owner(0);
            }
        }
        Ok(())
    }

    /// The other processes' guest RAM, each with the ranges that can hold anything (what a
    /// snapshot stores of it: see `populated_ranges`).
    pub fn parked_memories(&self) -> Vec<ParkedMemory<'_>> {
        self.procs
            .parked
            .iter()
            .filter_map(|(&pid, p)| p.memory.as_ref().map(|m| (pid, m)))
            .map(|(pid, m)| ParkedMemory {
                pid,
                ram: &m.ram,
                populated: crate::process::populated_ranges(&m.mm, m.ram.size()),
            })
            .collect()
    }

    /// The shared memory segments: id, memory file, size, and whether the file is a
    /// snapshot's (frozen: never written, so a new snapshot may keep it as it is).
    pub fn segment_files(&self) -> Vec<(u64, &Arc<File>, u64, bool)> {
        self.segments
            .all()
            .map(|(id, s)| (id, &s.file, s.size, s.frozen))
            .collect()
    }

    /// Whether some process maps segment `id` writable.
    fn segment_writable(&self, id: u64) -> bool {
        let parked = self.procs.parked.values().filter_map(|p| p.memory.as_ref());
        std::iter::once(&self.mm)
            .chain(parked.map(|m| &m.mm))
            .flat_map(|mm| mm.vmas())
            .any(|v| {
                v.segment.is_some_and(|(s, _)| s == id) && v.prot & libc::PROT_WRITE as u32 != 0
            })
    }

    /// The table's part of the snapshot state (the first process is current).
    pub(crate) fn table_state(&self) -> TableState {
        TableState {
            entries: self.procs.entries.clone(),
            others: self
                .procs
                .parked
                .iter()
                .map(|(&pid, p)| OtherState {
                    pid,
                    own: p.own.clone(),
                    memory: p.memory.as_ref().map(|m| MemoryLayout {
                        mm: m.mm.clone(),
                        vdso: m.vdso,
                    }),
                })
                .collect(),
            segments: self
                .segments
                .all()
                .map(|(id, s)| SegmentState {
                    id,
                    size: s.size,
                    node: s.node,
                    writable: self.segment_writable(id),
                })
                .collect(),
            next_segment: self.segments.next_id(),
            boot_ns: self.procs.boot_ns,
        }
    }

    /// Rebuilds the table, the other processes and the segments of a restored snapshot.
    pub(crate) fn restore_table(
        &mut self,
        table: &TableState,
        mut memory: OtherMemory,
    ) -> Result<(), SpawnError> {
        // Every fork passes here: it does no more than the snapshot's contents ask for.
        let mismatch = |what: String| SpawnError::Restore(what);
        if !table.memories().eq(memory.rams.keys().copied()) {
            let given: Vec<Pid> = memory.rams.keys().copied().collect();
            let wanted: Vec<Pid> = table.memories().collect();
            return Err(mismatch(format!(
                "memory for processes {given:?}, the snapshot has {wanted:?}"
            )));
        }
        let mut segments = Segments::restored(table.next_segment);
        let mut writable = Vec::new();
        for state in &table.segments {
            let file = memory
                .segments
                .remove(&state.id)
                .ok_or_else(|| mismatch(format!("no memory for segment {}", state.id)))?;
            segments.restore(state.id, file, state.size, state.node);
            if state.writable {
                writable.push(state.id);
            }
        }
        if let Some(&id) = memory.segments.keys().next() {
            return Err(mismatch(format!("segment {id} is not in the snapshot")));
        }
        self.segments = segments;
        for other in &table.others {
            let memory = match &other.memory {
                Some(layout) => {
                    let ram = memory.rams.remove(&other.pid).expect("checked above");
                    if ram.size() != self.ram.size() {
                        return Err(SpawnError::RamMismatch {
                            ram: ram.size(),
                            state: self.ram.size(),
                        });
                    }
                    Some(Memory {
                        tables: PageTables::for_ram(ram.size()),
                        ram,
                        mm: layout.mm.clone(),
                        stale: rangemap::RangeMap::new(),
                        vdso: layout.vdso,
                    })
                }
                None => None,
            };
            let parked = Parked {
                own: other.own.clone(),
                memory,
            };
            self.procs.parked.insert(other.pid, parked);
        }
        if !table.entries.contains_key(&INIT) {
            return Err(mismatch("the process table has no first process".into()));
        }
        // The fork goes on with the snapshot's start and its processes' (the host's
        // monotonic clock); one from an earlier boot of the host is moved back to start now.
        let now = self.procs.boot_ns;
        let shift = table.boot_ns.saturating_sub(now);
        self.procs.boot_ns = table.boot_ns - shift;
        self.procs.entries = table.entries.clone();
        for entry in self.procs.entries.values_mut() {
            entry.started_ns = entry.started_ns.saturating_sub(shift);
        }
        // A frozen segment needs no mapping: each process's memory already holds its bytes
        // where it maps it, and nobody can change them before it is thawed (which maps the
        // copy everywhere). Sparing the mapping spares every fork a host `mmap`. What a
        // process can write to gets a copy of its own now.
        for id in writable {
            self.thaw_segment(id)
                .map_err(|e| SpawnError::Restore(format!("copying segment {id}: {e}")))?;
        }
        Ok(())
    }
}
