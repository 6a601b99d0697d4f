//! Memory syscalls: `mmap`, `munmap`, `mprotect`, `brk`, `mremap`, `madvise`.
//!
//! All bookkeeping (see `mm`); page contents are managed through `GuestRam`: unmapped pages
//! are discarded to zero, file mappings are populated from the filesystem.
//!
//! Sizable anonymous memory is backed with huge pages where that needs no copying (see
//! `back_fresh_anonymous`): on this KVM, first-touch faults are the cost that dominates
//! large allocations.

use syscalls::Errno;

use super::SysResult;
use crate::file::FileObject;
use crate::memory::{PAGE_SIZE, page_align_up};
use crate::mm::{FileView, Vma, VmaKind};
use crate::process::Process;

/// Anonymous mappings (and `mremap` growths) at least this large get huge-page backing.
/// Smaller ones stay on 4 KiB pages, so a program with many small mappings does not pay
/// 2 MiB of host memory for each. CPython's object arenas are exactly 1 MiB, so a heap of
/// many small objects qualifies; the heap (`brk`) always does, as it only grows at its end.
const HUGE_BACKING_MIN: u64 = 1 << 20;

impl Process {
    pub(crate) fn sys_brk(&mut self, requested: u64) -> SysResult {
        let old_top = page_align_up(self.mm.brk()).unwrap_or(u64::MAX);
        let (now, discarded) = self.mm.set_brk(requested);
        self.discard(&discarded)?;
        if let Some(new_top) = page_align_up(now).filter(|&top| top > old_top) {
            self.back_fresh_anonymous(old_top, new_top)?;
        }
        Ok(now)
    }

    /// Gives huge-page backing to the 2 MiB blocks of `[start, end)`, a range just mapped
    /// anonymous (so reading as zero), in which nothing else is mapped: the rest of such a
    /// block is unmapped, so it reads as zero too, and swapping the block's backing for fresh
    /// huge pages changes no byte the program can see. KVM then maps each block the program
    /// touches with one fault instead of 512.
    fn back_fresh_anonymous(&self, start: u64, end: u64) -> Result<(), Errno> {
        for (block, block_end) in self.mm.huge_blocks_only_in(start, end) {
            self.ram
                .back_with_huge_pages(block, block_end - block)
                .map_err(|e| {
                    tracing::error!(error = %e, "backing guest pages with huge pages failed");
                    Errno::ENOMEM
                })?;
        }
        Ok(())
    }

    pub(crate) fn sys_mmap(
        &mut self,
        addr: u64,
        len: u64,
        prot: i32,
        flags: i32,
        fd: i32,
        offset: u64,
    ) -> SysResult {
        let len = Self::mapping_len(len)?;
        if !offset.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL.into());
        }
        let kind = flags & libc::MAP_TYPE;
        if kind != libc::MAP_PRIVATE && kind != libc::MAP_SHARED {
            return Err(Errno::EINVAL.into());
        }
        let anonymous = flags & libc::MAP_ANONYMOUS != 0;
        let (node, file_view) = if anonymous {
            (None, None)
        } else {
            let file = self.files.get(fd)?;
            match &file.object {
                FileObject::Node { node, .. } => {
                    if !file.readable() {
                        return Err(Errno::EACCES.into());
                    }
                    if kind == libc::MAP_SHARED && prot & libc::PROT_WRITE != 0 {
                        // Writes would have to reach the file; nothing here needs that.
                        return Err(Errno::ENODEV.into());
                    }
                    let view = FileView {
                        path: file.path.as_slice().into(),
                        ino: node.ino(),
                        offset,
                    };
                    (Some(*node), Some(view))
                }
                FileObject::Zero => (None, None),
                _ => return Err(Errno::ENODEV.into()),
            }
        };
        let start = if flags & (libc::MAP_FIXED | libc::MAP_FIXED_NOREPLACE) != 0 {
            if !addr.is_multiple_of(PAGE_SIZE) {
                return Err(Errno::EINVAL.into());
            }
            let end = addr.checked_add(len).ok_or(Errno::ENOMEM)?;
            if flags & libc::MAP_FIXED_NOREPLACE != 0
                && self.mm.vmas().any(|v| v.start < end && addr < v.end)
            {
                return Err(Errno::EEXIST.into());
            }
            addr
        } else {
            self.mm.find_free(len, addr)?
        };
        let vma_kind = if node.is_some() {
            VmaKind::File
        } else {
            VmaKind::Anonymous
        };
        let replaced = self.mm.map_fixed(Vma {
            start,
            end: start + len,
            prot: prot as u32,
            kind: vma_kind,
            shared: kind == libc::MAP_SHARED,
            file: file_view,
        })?;
        self.discard(&replaced)?;
        match node {
            Some(node) => self.populate_from_file(node, start, len, offset)?,
            // Thread stacks (MAP_STACK) are mostly untouched: Linux keeps them off huge pages
            // too.
            None if len >= HUGE_BACKING_MIN && flags & libc::MAP_STACK == 0 => {
                self.back_fresh_anonymous(start, start + len)?;
            }
            None => {}
        }
        Ok(start)
    }

    pub(crate) fn sys_munmap(&mut self, addr: u64, len: u64) -> SysResult {
        let removed = self.mm.unmap(addr, len)?;
        self.discard(&removed)?;
        Ok(0)
    }

    pub(crate) fn sys_mprotect(&mut self, addr: u64, len: u64, prot: u64) -> SysResult {
        self.mm.protect(addr, len, prot as u32)?;
        Ok(0)
    }

    pub(crate) fn sys_madvise(&mut self, addr: u64, len: u64, advice: i32) -> SysResult {
        if !addr.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL.into());
        }
        let len = page_align_up(len).ok_or(Errno::EINVAL)?;
        match advice {
            libc::MADV_DONTNEED | libc::MADV_FREE => {
                if !self.mm.is_mapped(addr, len) {
                    return Err(Errno::ENOMEM.into());
                }
                // Anonymous memory reads back as zero after DONTNEED; for private file
                // mappings Linux would re-read the file, which no program here relies on.
                // `is_mapped` guarantees `addr + len` does not overflow.
                self.discard(&[(addr, addr + len)])?;
                Ok(0)
            }
            _ => Ok(0),
        }
    }

    pub(crate) fn sys_mremap(
        &mut self,
        old: u64,
        old_len: u64,
        new_len: u64,
        flags: i32,
    ) -> SysResult {
        if !old.is_multiple_of(PAGE_SIZE)
            || flags & !(libc::MREMAP_MAYMOVE | libc::MREMAP_FIXED) != 0
        {
            return Err(Errno::EINVAL.into());
        }
        if flags & libc::MREMAP_FIXED != 0 {
            // Moving to a caller-chosen address: supported by glibc only via explicit use.
            return Err(Errno::EINVAL.into());
        }
        let old_len = page_align_up(old_len).ok_or(Errno::EINVAL)?;
        let new_len = Self::mapping_len(new_len)?;
        let vma = self.mm.vma_at(old).ok_or(Errno::EFAULT)?.clone();
        if old_len == 0 || !self.mm.is_mapped(old, old_len) {
            return Err(Errno::EFAULT.into());
        }
        if new_len <= old_len {
            let removed = self.mm.unmap(old + new_len, old_len - new_len);
            if let Ok(removed) = removed {
                self.discard(&removed)?;
            }
            return Ok(old);
        }
        let grow = new_len - old_len;
        // `is_mapped` above guarantees `old + old_len` does not overflow.
        let tail = old + old_len;
        let tail_end = tail.checked_add(grow).ok_or(Errno::ENOMEM)?;
        let tail_free = self.mm.vmas().all(|v| v.end <= tail || v.start >= tail_end)
            && tail_end <= self.mm.layout().mmap_top();
        // The mapping at `old`, continued (or moved) to `start..end`.
        let grown = |start: u64, end: u64| Vma {
            start,
            end,
            ..vma.piece_from(old)
        };
        let anonymous = vma.file.is_none();
        if tail_free && self.mm.map_fixed(grown(tail, tail_end)).is_ok() {
            if anonymous && grow >= HUGE_BACKING_MIN {
                self.back_fresh_anonymous(tail, tail_end)?;
            }
            return Ok(old);
        }
        if flags & libc::MREMAP_MAYMOVE == 0 {
            return Err(Errno::ENOMEM.into());
        }
        let target = self.mm.find_free(new_len, 0)?;
        self.mm.map_fixed(grown(target, target + new_len))?;
        self.ram.move_pages(old, target, old_len).map_err(|e| {
            tracing::error!(error = %e, "moving guest pages failed");
            Errno::ENOMEM
        })?;
        // The old range is already zero (move_pages leaves zero pages behind).
        self.mm.unmap(old, old_len)?;
        if anonymous && grow >= HUGE_BACKING_MIN {
            self.back_fresh_anonymous(target + old_len, target + new_len)?;
        }
        Ok(target)
    }
}
