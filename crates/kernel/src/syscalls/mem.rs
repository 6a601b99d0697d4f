//! Memory syscalls: `mmap`, `munmap`, `mprotect`, `brk`, `mremap`, `madvise`.
//!
//! All bookkeeping (see `mm`); page contents are managed through `GuestRam`: unmapped pages
//! are discarded to zero, file mappings are populated from the filesystem.

use syscalls::Errno;

use super::SysResult;
use crate::file::FileObject;
use crate::memory::{PAGE_SIZE, page_align_up};
use crate::mm::VmaKind;
use crate::process::Process;

impl Process {
    pub(crate) fn sys_brk(&mut self, requested: u64) -> SysResult {
        let (now, discarded) = self.mm.set_brk(requested);
        self.discard(&discarded)?;
        Ok(now)
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
        let node = if anonymous {
            None
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
                    Some(*node)
                }
                FileObject::Zero => None,
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
        let replaced = self.mm.map_fixed(start, len, prot as u32, vma_kind)?;
        self.discard(&replaced)?;
        if let Some(node) = node {
            self.populate_from_file(node, start, len, offset)?;
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
        let vma = *self.mm.vma_at(old).ok_or(Errno::EFAULT)?;
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
        if tail_free && self.mm.map_fixed(tail, grow, vma.prot, vma.kind).is_ok() {
            return Ok(old);
        }
        if flags & libc::MREMAP_MAYMOVE == 0 {
            return Err(Errno::ENOMEM.into());
        }
        let target = self.mm.find_free(new_len, 0)?;
        self.mm.map_fixed(target, new_len, vma.prot, vma.kind)?;
        self.ram.move_pages(old, target, old_len).map_err(|e| {
            tracing::error!(error = %e, "moving guest pages failed");
            Errno::ENOMEM
        })?;
        // The old range is already zero (move_pages leaves zero pages behind).
        self.mm.unmap(old, old_len)?;
        Ok(target)
    }
}
