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
//!
//! A fork of a snapshot gets the snapshot's segments *frozen*: the stored file itself,
//! mapped read-only on the host, shared with every other fork. Most are read-only file
//! mappings (glibc's locale caches) that no fork ever writes, and copying them would cost
//! every fork. The first thing that could write one (a writable mapping, `mprotect`, a
//! `write` to its file) gives the sandbox a copy of its own first (`thaw_segment`).

use std::collections::{BTreeMap, BTreeSet};
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use forkvm_image::NodeId;
use forkvm_memory::ram::{GuestRam, copy_memory_file, memory_file, page_align_up};
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
    /// `file` is a snapshot's, shared with other sandboxes: never to be written.
    pub frozen: bool,
}

impl Segment {
    /// Shows `[start, start+len)` of the segment from `offset` in `ram` (read-only on the
    /// host while frozen).
    pub fn map_into(&self, ram: &GuestRam, start: u64, len: u64, offset: u64) -> Result<(), Errno> {
        ram.map_shared(start, len, &self.file, offset, !self.frozen)
            .map_err(host_error)
    }
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

    /// Every segment, by id.
    pub fn all(&self) -> impl Iterator<Item = (u64, &Segment)> {
        self.by_id.iter().map(|(&id, s)| (id, s))
    }

    /// The last id given out (a snapshot keeps it).
    pub fn next_id(&self) -> u64 {
        self.next_id
    }

    /// No segments yet, ids given out after `next_id` (a restored snapshot's).
    pub fn restored(next_id: u64) -> Segments {
        Segments {
            by_id: BTreeMap::new(),
            next_id,
        }
    }

    /// Puts back segment `id` of a restored snapshot, frozen.
    pub fn restore(&mut self, id: u64, file: Arc<File>, size: u64, node: Option<NodeId>) {
        let segment = Segment {
            file,
            size,
            node,
            frozen: true,
        };
        self.by_id.insert(id, segment);
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
            frozen: false,
        }))
    }

    /// The segment of `node`'s shared mappings, reaching at least `end` bytes: made and
    /// filled from the file the first time, grown (with the file's bytes there) later.
    pub(crate) fn node_segment(&mut self, node: NodeId, end: u64) -> Result<u64, Errno> {
        let end = page_align_up(end).ok_or(Errno::ENOMEM)?;
        let (id, from) = match self.segments.of_node(node) {
            Some(id) => {
                // The new mapping may be writable.
                self.thaw_segment(id)?;
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
                    frozen: false,
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
        segment.map_into(&self.ram, start, len, offset)
    }

    /// Gives the sandbox its own copy of frozen segment `id` (see the module's notes) and
    /// shows it in place of the snapshot's in every process that maps it.
    pub(crate) fn thaw_segment(&mut self, id: u64) -> Result<(), Errno> {
        let Some(segment) = self.segments.by_id.get_mut(&id) else {
            return Ok(());
        };
        if !segment.frozen {
            return Ok(());
        }
        let copy =
            copy_memory_file(c"forkvm-shared", &segment.file, segment.size).map_err(host_error)?;
        segment.file = Arc::new(copy);
        segment.frozen = false;
        let segment = &self.segments.by_id[&id];
        let parked = self.procs.parked.values().filter_map(|p| p.memory.as_ref());
        for (ram, mm) in
            std::iter::once((&self.ram, &self.mm)).chain(parked.map(|m| (&m.ram, &m.mm)))
        {
            for (start, end, _, offset) in segment_vmas(mm).into_iter().filter(|v| v.2 == id) {
                segment.map_into(ram, start, end - start, offset)?;
            }
        }
        Ok(())
    }

    /// Thaws the frozen segments `[start, start+len)` of the current memory shows (before
    /// it may become writable).
    pub(crate) fn thaw_segments_in(&mut self, start: u64, len: u64) -> Result<(), Errno> {
        let end = start.saturating_add(len);
        let ids: BTreeSet<u64> = segment_vmas(&self.mm)
            .into_iter()
            .filter(|&(s, e, _, _)| s < end && start < e)
            .map(|v| v.2)
            .collect();
        for id in ids {
            self.thaw_segment(id)?;
        }
        Ok(())
    }

    /// `data` was written to `node` at `offset`: its segment (what every shared mapping of
    /// it shows) gets the same bytes. Returns whether it has a segment.
    pub(crate) fn write_to_node_segment(&mut self, node: NodeId, offset: u64, data: &[u8]) -> bool {
        let Some(id) = self.segments.of_node(node) else {
            return false;
        };
        if self.thaw_segment(id).is_err() {
            return true;
        }
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
        segment_vmas(&self.mm)
            .into_iter()
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

/// The segment mappings of `mm`: guest start, end, segment id, segment offset.
pub(crate) fn segment_vmas(mm: &AddressSpace) -> Vec<(u64, u64, u64, u64)> {
    mm.vmas()
        .filter_map(|v| v.segment.map(|(id, offset)| (v.start, v.end, id, offset)))
        .collect()
}

/// Where `mm` shows byte `offset` of segment `id`, if it does.
fn address_of(mm: &AddressSpace, id: u64, offset: u64) -> Option<u64> {
    mm.vmas().find_map(|v| {
        let (seg, first) = v.segment?;
        let len = v.end - v.start;
        (seg == id && first <= offset && offset < first + len).then(|| v.start + (offset - first))
    })
}
