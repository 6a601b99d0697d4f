//! `MAP_SHARED` file mappings: the mapped pages and the file hold the same bytes.
//!
//! Linux gets that for free (both are the page cache); here a mapping is a copy of the
//! file's bytes in guest memory, so the two are kept in step at the points a program can
//! tell: what the program wrote through a writable mapping goes to the file at `msync`,
//! `munmap` (or a mapping replacing it) and before anything reads the file (`read`,
//! `sendfile`, a new mapping); what is written to the file with `write` is copied into
//! its shared mappings. Bytes past the end of the file are not written back (on Linux,
//! touching them is `SIGBUS`).

use forkvm_image::NodeId;
use syscalls::Errno;

use super::SysResult;
use crate::errno::from_fs;
use crate::process::Process;
use forkvm_memory::ram::{PAGE_SIZE, page_align_up};

/// Bytes copied per step between guest memory and the file.
const CHUNK: u64 = 1 << 20;

/// A piece of a shared mapping: guest range and the file offset of its first byte.
struct Piece {
    node: NodeId,
    start: u64,
    end: u64,
    offset: u64,
}

impl Process {
    /// The pieces of shared mappings of `node` (any node when `None`) inside
    /// `[start, end)`; with `writable`, only those that write back.
    fn shared_pieces(
        &self,
        node: Option<NodeId>,
        start: u64,
        end: u64,
        writable: bool,
    ) -> Vec<Piece> {
        self.mm
            .vmas()
            .filter(|v| v.start < end && start < v.end)
            .filter_map(|v| {
                let file = v.file.as_ref()?;
                let with = file.shared_with?;
                if node.is_some_and(|n| n != with) || (writable && !file.write_back) {
                    return None;
                }
                let from = v.start.max(start);
                Some(Piece {
                    node: with,
                    start: from,
                    end: v.end.min(end),
                    offset: file.offset + (from - v.start),
                })
            })
            .collect()
    }

    /// Writes what the program's writable shared mappings of `node` (of any file when
    /// `None`) hold in `[start, end)` to their files.
    pub(crate) fn write_back_shared(
        &mut self,
        node: Option<NodeId>,
        start: u64,
        end: u64,
    ) -> Result<(), Errno> {
        for piece in self.shared_pieces(node, start, end, true) {
            let size = self.fs.stat(piece.node).map_err(from_fs)?.size;
            let end = piece
                .end
                .min(piece.start + size.saturating_sub(piece.offset));
            let mut at = piece.start;
            while at < end {
                let n = (end - at).min(CHUNK);
                let mut data = vec![0u8; n as usize];
                self.ram.read(at, &mut data).map_err(|_| Errno::EFAULT)?;
                self.fs
                    .write_at(piece.node, piece.offset + (at - piece.start), &data)
                    .map_err(from_fs)?;
                at += n;
            }
        }
        Ok(())
    }

    /// Before `node` is read: the bytes its writable shared mappings hold reach it.
    pub(crate) fn sync_shared_to_file(&mut self, node: NodeId) -> Result<(), Errno> {
        self.write_back_shared(Some(node), 0, u64::MAX)
    }

    /// After `[offset, offset + len)` of `node` was written: its shared mappings show it.
    pub(crate) fn sync_file_to_shared(
        &mut self,
        node: NodeId,
        offset: u64,
        len: u64,
    ) -> Result<(), Errno> {
        // Shared mappings in other processes show the file's segment: it gets the bytes.
        if len > 0 && self.segments.of_node(node).is_some() {
            let mut data = vec![0u8; len.min(16 << 20) as usize];
            let n = self.fs.read_at(node, offset, &mut data).map_err(from_fs)?;
            self.write_to_node_segment(node, offset, &data[..n]);
        }
        for piece in self.shared_pieces(Some(node), 0, u64::MAX, false) {
            let piece_len = piece.end - piece.start;
            let from = offset.max(piece.offset);
            let to = (offset + len).min(piece.offset + piece_len);
            if from >= to {
                continue;
            }
            let mut data = vec![0u8; (to - from) as usize];
            let n = self.fs.read_at(node, from, &mut data).map_err(from_fs)?;
            self.ram
                .write(piece.start + (from - piece.offset), &data[..n])
                .map_err(|_| Errno::EFAULT)?;
        }
        Ok(())
    }

    /// `msync`: writable shared mappings in the range reach their files.
    pub(crate) fn sys_msync(&mut self, addr: u64, len: u64, flags: i32) -> SysResult {
        const VALID: i32 = libc::MS_ASYNC | libc::MS_SYNC | libc::MS_INVALIDATE;
        if !addr.is_multiple_of(PAGE_SIZE)
            || flags & !VALID != 0
            || flags & (libc::MS_ASYNC | libc::MS_SYNC) == libc::MS_ASYNC | libc::MS_SYNC
        {
            return Err(Errno::EINVAL.into());
        }
        let len = page_align_up(len).ok_or(Errno::ENOMEM)?;
        let end = addr.checked_add(len).ok_or(Errno::ENOMEM)?;
        if len > 0 && !self.mm.is_mapped(addr, len) {
            return Err(Errno::ENOMEM.into());
        }
        self.write_back_shared(None, addr, end)?;
        Ok(0)
    }
}
