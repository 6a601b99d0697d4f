//! Suspending a fork for storage, and reviving it: the basis of sessions that are paused,
//! written to disk and resumed later, by another process or after a restart.
//!
//! `snapshot_fork` keeps a chain of in-memory layers over whatever the fork's memory was a
//! view of; storage needs something self-contained instead. A suspended fork holds, for
//! each of its processes, one file of the pages it differs from its template by (every
//! layer above the template's own memory flattened into one), or all its memory when it is
//! a view of nothing the template has (a process that ran `execve`, a flattened chain); and
//! a copy of each shared segment. The files are anonymous memory files, copied from the
//! fork at this moment: the fork may go on running while they are stored.

use std::fs::File;
use std::sync::Arc;

use forkvm_kernel::ProcessState;
use forkvm_kernel::procs::Pid;
use forkvm_memory::backing::{Backing, Layer, merge_ranges};
use forkvm_memory::ram::{GuestRam, MemoryError, PAGE_SIZE, copy_memory_file};

use crate::fork::{ForkSource, OtherSources};
use crate::layer::copy_pages;
use crate::{Sandbox, SandboxError, VcpuState, Vmm, VmmError};

/// Whose memory a suspended file holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Part {
    /// The fork's first process (the agent's).
    Main,
    /// Another process, by pid.
    Process(Pid),
    /// A shared memory segment, by id.
    Segment(u64),
}

/// One memory file of a suspended fork.
#[derive(Debug)]
pub struct SuspendedMemory {
    pub part: Part,
    /// The file's size: guest RAM for a process, the segment's size for a segment.
    pub size: u64,
    /// Ranges (sorted, page aligned) the file defines; outside them the memory is the
    /// template's (`over_template`) or zero. Holes inside them read as zero.
    pub ranges: Vec<(u64, u64)>,
    /// Whether the file is a layer over the template's memory of the same process.
    pub over_template: bool,
    pub file: File,
}

/// A fork's complete state, independent of the process that ran it.
pub struct Suspended {
    pub vcpu: VcpuState,
    pub process: ProcessState,
    pub memories: Vec<SuspendedMemory>,
}

/// Why a suspended fork cannot be revived over a template.
#[derive(Debug, thiserror::Error)]
pub enum ReviveError {
    #[error("suspended memory {0:?} is a layer over memory the template does not have")]
    NoTemplateMemory(Part),
    #[error("suspended memory {part:?} is malformed: {why}")]
    Malformed { part: Part, why: String },
    #[error("the suspended state names memory {0:?}, which was not stored")]
    Missing(Part),
    #[error("reading the suspended memory: {0}")]
    Memory(#[from] MemoryError),
}

/// The file and ranges storing `ram`: the pages it differs from `template` by, when it is a
/// view of `template`'s memory; else all it may hold (`populated`).
fn suspend_ram(
    part: Part,
    ram: &GuestRam,
    populated: Vec<(u64, u64)>,
    template: Option<&Backing>,
) -> Result<SuspendedMemory, MemoryError> {
    let changed = ram.changed_ranges()?;
    let origin = ram.origin();
    let over_template = matches!((origin, template),
        (Some(origin), Some(template)) if Arc::ptr_eq(&origin.base, &template.base)
            && template.layers.is_empty());
    // What differs from the template: the pages changed since the last snapshot and every
    // layer above the template; over nothing of the template's, all it may hold too.
    let mut ranges = changed;
    for layer in origin.into_iter().flat_map(|o| &o.layers) {
        ranges.extend(layer.ranges.iter().copied());
    }
    if !over_template {
        ranges.extend(populated);
    }
    let ranges = merge_ranges(ranges);
    let file = forkvm_memory::ram::memory_file(c"forkvm-suspended", ram.size())?;
    copy_pages(ram, &file, &ranges)?;
    Ok(SuspendedMemory {
        part,
        size: ram.size(),
        ranges,
        over_template,
        file,
    })
}

impl Vmm {
    /// Suspends `sandbox`, a fork of `template` (or of a fork of it) parked on its control
    /// channel, into files that hold it completely (see the module's documentation). The
    /// sandbox is unchanged and may run on.
    pub fn suspend(
        &self,
        sandbox: &mut Sandbox,
        template: &ForkSource,
    ) -> Result<Suspended, VmmError> {
        if !sandbox.process().awaiting_control() {
            return Err(SandboxError::NotParked.into());
        }
        let vcpu = sandbox.capture()?;
        let process = sandbox.process();
        let mut memories = vec![suspend_ram(
            Part::Main,
            process.ram(),
            process.populated_ranges(),
            Some(&template.backing),
        )?];
        for parked in process.parked_memories() {
            let part = Part::Process(parked.pid);
            let own = template.others.memories.get(&parked.pid);
            memories.push(suspend_ram(part, parked.ram, parked.populated, own)?);
        }
        for (id, file, size, _) in process.segment_files() {
            memories.push(SuspendedMemory {
                part: Part::Segment(id),
                size,
                ranges: vec![(0, size.next_multiple_of(PAGE_SIZE))],
                over_template: false,
                file: copy_memory_file(c"forkvm-segment", file, size)?,
            });
        }
        Ok(Suspended {
            vcpu,
            process: process.state(),
            memories,
        })
    }

    /// A source whose forks start from `suspended`, a fork of `template` (their memory is
    /// the template's with the suspended files over it).
    pub fn revive(
        &self,
        suspended: Suspended,
        template: &ForkSource,
    ) -> Result<ForkSource, ReviveError> {
        let ram_size = suspended.process.ram_size();
        let mut main = None;
        let mut others = OtherSources::default();
        for memory in suspended.memories {
            let part = memory.part;
            let backing = match part {
                Part::Segment(id) => {
                    others.segments.insert(id, Arc::new(memory.file));
                    continue;
                }
                Part::Main => backing_over(memory, Some(&template.backing), ram_size)?,
                Part::Process(pid) => {
                    backing_over(memory, template.others.memories.get(&pid), ram_size)?
                }
            };
            match part {
                Part::Main => main = Some(backing),
                Part::Process(pid) => {
                    others.memories.insert(pid, backing);
                }
                Part::Segment(_) => {}
            }
        }
        let backing = main.ok_or(ReviveError::Missing(Part::Main))?;
        for pid in suspended.process.memories() {
            if !others.memories.contains_key(&pid) {
                return Err(ReviveError::Missing(Part::Process(pid)));
            }
        }
        for (id, _) in suspended.process.segments() {
            if !others.segments.contains_key(&id) {
                return Err(ReviveError::Missing(Part::Segment(id)));
            }
        }
        Ok(ForkSource {
            backing,
            vcpu: suspended.vcpu,
            process: suspended.process,
            image: template.image.clone(),
            others,
            first_writes: Default::default(),
        })
    }
}

/// The backing of one process's suspended memory: a layer over `template`'s, or its own.
/// The ranges come from storage: they must be sorted, disjoint, page aligned and inside
/// RAM, since mapping them replaces guest memory.
fn backing_over(
    memory: SuspendedMemory,
    template: Option<&Backing>,
    ram_size: u64,
) -> Result<Backing, ReviveError> {
    let malformed = |why: String| ReviveError::Malformed {
        part: memory.part,
        why,
    };
    if memory.size != ram_size {
        return Err(malformed(format!(
            "{} bytes for a {ram_size}-byte guest",
            memory.size
        )));
    }
    let mut previous_end = 0;
    for &(start, end) in &memory.ranges {
        let aligned = start % PAGE_SIZE == 0 && end % PAGE_SIZE == 0;
        if !aligned || start >= end || end > ram_size || start < previous_end {
            return Err(malformed(format!("range {start:#x}..{end:#x}")));
        }
        previous_end = end;
    }
    if !memory.over_template {
        return Ok(Backing::file(memory.file));
    }
    let template = template.ok_or(ReviveError::NoTemplateMemory(memory.part))?;
    let mut backing = template.clone();
    backing.layers.push(Layer {
        file: Arc::new(memory.file),
        ranges: memory.ranges,
    });
    Ok(backing)
}
