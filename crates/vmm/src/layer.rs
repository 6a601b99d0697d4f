//! Snapshotting a fork: the basis for sessions that branch.
//!
//! A fork parked on its control channel becomes a new `ForkSource` whose memory is its
//! parent's backing plus one layer holding the pages this fork changed (found precisely:
//! private copies and replaced ranges, see `forkvm_memory::backing`); each of its other
//! processes gets the same over the backing its own memory is a view of. Layers live in
//! anonymous memory files (`memfd`): a branch costs only the pages it changed, and its
//! memory goes back to the host when the last fork of it is gone. Chains are bounded:
//! past `MAX_LAYERS`, the snapshot is flattened into one new base.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use forkvm_memory::backing::{Backing, Layer, merge_ranges};
use forkvm_memory::ram::{GuestRam, MemoryError, PAGE_SIZE, copy_memory_file};

use crate::fork::{ForkSource, OtherSources};
use crate::{Sandbox, SandboxError, Vmm, VmmError};

/// Layers a snapshot may stack before it is flattened.
pub const MAX_LAYERS: usize = 8;

/// An anonymous, sparse memory file of `size` bytes.
/// Guest RAM read at once while copying a layer.
const COPY_CHUNK: usize = 1 << 20;

/// Copies the non-zero pages of `ranges` from guest RAM into `file` at their own offsets,
/// a megabyte read at a time and each run of non-zero pages in one write. (What a layer
/// costs is mostly the copying and the memory file's new pages: for a 15 MiB session,
/// about 9 ms of a 10 ms snapshot either way.)
pub(crate) fn copy_pages(
    ram: &GuestRam,
    file: &File,
    ranges: &[(u64, u64)],
) -> Result<(), MemoryError> {
    let page = PAGE_SIZE as usize;
    let mut chunk = vec![0u8; COPY_CHUNK];
    for &(start, end) in ranges {
        let mut addr = start;
        while addr < end {
            let len = (end - addr).min(COPY_CHUNK as u64) as usize;
            let data = &mut chunk[..len];
            ram.read(addr, data).map_err(|_| MemoryError::BadRange {
                addr,
                len: len as u64,
            })?;
            let mut run: Option<usize> = None;
            for at in (0..len).step_by(page).chain(std::iter::once(len)) {
                let nonzero = at < len && data[at..(at + page).min(len)].iter().any(|&b| b != 0);
                match (nonzero, run) {
                    (true, None) => run = Some(at),
                    (false, Some(from)) => {
                        file.write_all_at(&data[from..at], addr + from as u64)
                            .map_err(MemoryError::Remap)?;
                        run = None;
                    }
                    _ => {}
                }
            }
            addr += len as u64;
        }
    }
    Ok(())
}

/// The backing a snapshot keeps of `ram` (whose mappings lie in `populated`): the
/// backing it is a view of plus a layer of the pages it changed; past `MAX_LAYERS`, or for
/// RAM that is a view of nothing (a process that ran `execve`), one new base file.
fn backing_of(ram: &GuestRam, populated: Vec<(u64, u64)>) -> Result<Backing, MemoryError> {
    let changed = ram.changed_ranges()?;
    let file = forkvm_memory::ram::memory_file(c"forkvm-layer", ram.size())?;
    match ram.origin() {
        Some(origin) if origin.layers.len() < MAX_LAYERS => {
            copy_pages(ram, &file, &changed)?;
            let mut layers = origin.layers.clone();
            layers.push(Layer {
                file: Arc::new(file),
                ranges: changed,
            });
            Ok(Backing {
                base: origin.base.clone(),
                layers,
                pins: origin.pins.clone(),
            })
        }
        Some(origin) => {
            // Flatten: everything that can hold data goes into one new base.
            let mut ranges = populated;
            ranges.extend(changed);
            for layer in &origin.layers {
                ranges.extend(layer.ranges.iter().copied());
            }
            copy_pages(ram, &file, &merge_ranges(ranges))?;
            Ok(Backing::file(file))
        }
        // Fresh RAM is zero wherever it has not changed.
        None => {
            copy_pages(ram, &file, &changed)?;
            Ok(Backing::file(file))
        }
    }
}

impl Vmm {
    /// Snapshots `sandbox`, a fork parked on its control channel, into a new source whose
    /// forks see its state at this moment (every process, every shared segment) and
    /// nothing it does later.
    pub fn snapshot_fork(
        &self,
        sandbox: &mut Sandbox,
        parent: &ForkSource,
    ) -> Result<ForkSource, VmmError> {
        if !sandbox.process().awaiting_control() {
            return Err(SandboxError::NotParked.into());
        }
        let vcpu = sandbox.capture()?;
        let process = sandbox.process();
        let backing = backing_of(process.ram(), process.populated_ranges())?;
        let mut others = OtherSources::default();
        for parked in process.parked_memories() {
            let backing = backing_of(parked.ram, parked.populated)?;
            others.memories.insert(parked.pid, backing);
        }
        for (id, file, size, frozen) in process.segment_files() {
            let stored = match frozen {
                true => file.clone(),
                false => Arc::new(copy_memory_file(c"forkvm-segment", file, size)?),
            };
            others.segments.insert(id, stored);
        }
        Ok(ForkSource {
            backing,
            vcpu,
            process: process.state(),
            image: parent.image.clone(),
            others,
            first_writes: Default::default(),
        })
    }
}
