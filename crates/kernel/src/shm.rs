//! Memory several processes map at once: `MAP_SHARED` mappings.
//!
//! Each process has guest RAM of its own, so memory that processes share cannot be part
//! of any one of them. A shared mapping is instead a *segment*: a host memory file mapped
//! `MAP_SHARED` into the guest RAM of every process that maps it, so a write by one is a
//! write for all. An anonymous `MAP_SHARED` mapping makes a segment of its own, which its
//! `fork` children map at the same place (multiprocessing's `Value`, `Array`, heaps); a file
//! mapped shared gets one segment per file, filled from it, which every shared mapping of
//! the file in any process shows (glibc's `sem_open` semaphores, which multiprocessing's
//! locks and queues use, live in such a file under `/dev/shm`). The file itself is kept in
//! step as before (`syscalls::shared`). A futex in a segment is woken across processes.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use forkvm_image::NodeId;
use forkvm_memory::ram::{memory_file, page_align_up};
use syscalls::Errno;

use crate::mm::AddressSpace;
use crate::process::Process;
use crate::threads::Tid;

/// One segment.
pub(crate) struct Segment {
    pub file: Arc<File>,
    pub size: u64,
    /// The file whose shared mappings it holds, if any.
    pub node: Option<NodeId>,
}

/// The sandbox's segments, by id.
#[derive(Default)]
pub(crate) struct Segments {
    by_id: BTreeMap<u64, Segment>,
    next_id: u64,
}

impl Segments {
    fn insert(&mut self, segment: Segment) -> u64 {
        self.next_id += 1;
        self.by_id.insert(self.next_id, segment);
        self.next_id
    }

    /// Host memory the segments hold (their files' allocated pages).
    pub fn resident_bytes(&self) -> u64 {
        use std::os::unix::fs::MetadataExt;
        self.by_id
            .values()
            .filter_map(|s| s.file.metadata().ok())
            .map(|m| m.blocks() * 512)
            .sum()
    }

    pub fn get(&self, id: u64) -> Option<&Segment> {
        self.by_id.get(&id)
    }

    pub fn of_node(&self, node: NodeId) -> Option<u64> {
        self.by_id
            .iter()
            .find(|(_, s)| s.node == Some(node))
            .map(|(&id, _)| id)
    }

    /// Drops the segments no mapping in `spaces` shows any more.
    fn keep_only_used<'a>(&mut self, spaces: impl Iterator<Item = &'a AddressSpace>) {
        let used: BTreeSet<u64> = spaces
            .flat_map(|mm| mm.vmas().filter_map(|v| v.segment.map(|(id, _)| id)))
            .collect();
        self.by_id.retain(|id, _| used.contains(id));
    }
}

fn host_error(e: impl std::fmt::Display) -> Errno {
    tracing::warn!(error = %e, "shared memory segment");
    Errno::ENOMEM
}

impl Process {
    /// A new segment of `len` bytes for an anonymous shared mapping.
    pub(crate) fn new_anonymous_segment(&mut self, len: u64) -> Result<u64, Errno> {
        let file = memory_file(c"forkvm-shared", len).map_err(host_error)?;
        Ok(self.segments.insert(Segment {
            file: Arc::new(file),
            size: len,
            node: None,
        }))
    }

    /// The segment of `node`'s shared mappings, reaching at least `end` bytes: made and
    /// filled from the file the first time, grown (with the file's bytes there) later.
    pub(crate) fn node_segment(&mut self, node: NodeId, end: u64) -> Result<u64, Errno> {
        let end = page_align_up(end).ok_or(Errno::ENOMEM)?;
        let (id, from) = match self.segments.of_node(node) {
            Some(id) => {
                let segment = &self.segments.by_id[&id];
                if segment.size >= end {
                    return Ok(id);
                }
                segment.file.set_len(end).map_err(host_error)?;
                (id, segment.size)
            }
            None => {
                let file = memory_file(c"forkvm-shared-file", end).map_err(host_error)?;
                let id = self.segments.insert(Segment {
                    file: Arc::new(file),
                    size: end,
                    node: Some(node),
                });
                (id, 0)
            }
        };
        let segment = self
            .segments
            .by_id
            .get_mut(&id)
            .expect("just found or made");
        segment.size = end;
        let file = segment.file.clone();
        let mut buf = vec![0u8; (end - from).min(1 << 20) as usize];
        let mut at = from;
        while at < end {
            let want = ((end - at) as usize).min(buf.len());
            let n = self
                .fs
                .read_at(node, at, &mut buf[..want])
                .map_err(crate::errno::from_fs)?;
            if n == 0 {
                break;
            }
            file.write_all_at(&buf[..n], at).map_err(host_error)?;
            at += n as u64;
        }
        Ok(id)
    }

    /// Shows `[start, start+len)` of segment `id` from `offset` at guest `start`.
    pub(crate) fn map_segment(
        &self,
        id: u64,
        start: u64,
        len: u64,
        offset: u64,
    ) -> Result<(), Errno> {
        let segment = self.segments.get(id).ok_or(Errno::EINVAL)?;
        self.ram
            .map_shared(start, len, &segment.file, offset)
            .map_err(host_error)
    }

    /// `data` was written to `node` at `offset`: its segment (what every shared mapping of
    /// it shows) gets the same bytes. Returns whether it has a segment.
    pub(crate) fn write_to_node_segment(&self, node: NodeId, offset: u64, data: &[u8]) -> bool {
        let Some(id) = self.segments.of_node(node) else {
            return false;
        };
        let segment = &self.segments.by_id[&id];
        let end = (offset + data.len() as u64).min(segment.size);
        if offset < end {
            let _ = segment
                .file
                .write_all_at(&data[..(end - offset) as usize], offset)
                .map_err(host_error);
        }
        true
    }

    /// The segment ranges of the current memory: guest range, segment id, segment offset.
    pub(crate) fn segment_ranges(&self) -> Vec<(u64, u64, u64, u64)> {
        self.mm
            .vmas()
            .filter_map(|v| v.segment.map(|(id, offset)| (v.start, v.end, id, offset)))
            .filter(|&(_, _, id, _)| self.segments.get(id).is_some())
            .collect()
    }

    /// Drops segments no process maps any more (after an unmap or a process's end).
    pub(crate) fn forget_unused_segments(&mut self) {
        let parked = self
            .procs
            .parked
            .values()
            .filter_map(|p| p.memory.as_ref().map(|m| &m.mm));
        self.segments
            .keep_only_used(std::iter::once(&self.mm).chain(parked));
    }

    /// Wakes up to `count` waiters of futex `addr` in other processes that map the same
    /// segment byte (a process-shared mutex or semaphore). Returns how many woke.
    pub(crate) fn wake_shared_futex(&mut self, addr: u64, bitset: u32, count: usize) -> usize {
        let Some((id, offset)) = self.mm.vmas().find_map(|v| {
            (v.start <= addr && addr < v.end)
                .then_some(v.segment)
                .flatten()
                .map(|(id, o)| (id, o + (addr - v.start)))
        }) else {
            return 0;
        };
        let mut woken = 0;
        let pids: Vec<Tid> = self.procs.parked.keys().copied().collect();
        for pid in pids {
            if woken >= count {
                break;
            }
            let owner = self.procs.memory_owner(pid);
            let there = self
                .procs
                .parked
                .get(&owner)
                .and_then(|p| p.memory.as_ref())
                .and_then(|m| address_of(&m.mm, id, offset));
            if let (Some(there), Some(parked)) = (there, self.procs.parked.get_mut(&pid)) {
                woken += parked.own.threads.futex_wake(there, bitset, count - woken);
            }
        }
        woken
    }
}

/// Where `mm` shows byte `offset` of segment `id`, if it does.
fn address_of(mm: &AddressSpace, id: u64, offset: u64) -> Option<u64> {
    mm.vmas().find_map(|v| {
        let (seg, first) = v.segment?;
        let len = v.end - v.start;
        (seg == id && first <= offset && offset < first + len).then(|| v.start + (offset - first))
    })
}
