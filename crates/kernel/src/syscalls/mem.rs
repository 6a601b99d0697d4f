//! Memory syscalls: `mmap`, `munmap`, `mprotect`, `brk`, `mremap`, `madvise`.
//!
//! All bookkeeping (see `mm`); page contents are managed through `GuestRam`: unmapped pages
//! are discarded to zero, file mappings are populated from the filesystem.
//!
//! Fresh anonymous memory is made cheap to touch for the first time (huge pages for sizable
//! ranges, host-side population for small ones; see `prepare_fresh_anonymous`): on this
//! KVM, first-touch faults are the cost that dominates allocation-heavy code.

use syscalls::Errno;

use super::SysResult;
use crate::file::FileObject;
use crate::high;
use crate::mm::{FileView, HighChange, OnFork, RESERVATION_HEADROOM, Vma, VmaKind};
use crate::process::Process;
use forkvm_memory::ram::{PAGE_SIZE, page_align_up};

/// Anonymous mappings (and `mremap` growths) at least this large get huge-page backing;
/// smaller ones are populated instead (see `prepare_fresh_anonymous`), so a program with
/// many small mappings does not pay 2 MiB of host memory for each. CPython's object arenas
/// are exactly 1 MiB, so a heap of many small objects qualifies; the heap (`brk`) always
/// does, as it only grows at its end.
const HUGE_BACKING_MIN: u64 = 1 << 20;

impl Process {
    pub(crate) fn sys_brk(&mut self, requested: u64) -> SysResult {
        let old_top = page_align_up(self.mm.brk()).unwrap_or(u64::MAX);
        let (now, released) = self.mm.set_brk(requested);
        self.release_unmapped(&released)?;
        if let Some(new_top) = page_align_up(now).filter(|&top| top > old_top) {
            self.reuse(old_top, new_top - old_top)?;
            self.back_free_blocks_with_huge_pages(old_top, new_top)?;
        }
        Ok(now)
    }

    /// Prepares `[start, end)`, a range just mapped anonymous (so reading as zero), for its
    /// first touch, which on this KVM costs a host fault and a shadow-paging fault per page.
    ///
    /// A range of `HUGE_BACKING_MIN` or more gets huge-page backing for each 2 MiB block of
    /// it in which nothing else is mapped: the rest of such a block is unmapped, so it reads
    /// as zero too, and swapping its backing changes no byte the program can see. KVM then
    /// maps the block with one fault instead of 512. Blocks holding pages touched before are
    /// left alone: those were kept zeroed when the program unmapped them (`freed`), or are
    /// the rest of a huge page it gave back in part, and KVM maps them already.
    ///
    /// A smaller range is populated on the host now, in one call: such a mapping is
    /// typically one malloc'd block, about to be used whole. KVM then maps 8 present
    /// neighbours per fault (its fault-time prefetch), and the host's faults are taken in
    /// bulk instead of one exit each. (Larger ranges are not: a 1 MiB CPython arena or a
    /// BLAS buffer is used a little at a time, and populating the rest cost more than it
    /// saved in small requests.)
    fn prepare_fresh_anonymous(&self, start: u64, end: u64) -> Result<(), Errno> {
        if end - start < HUGE_BACKING_MIN {
            self.ram.populate(start, end - start);
            return Ok(());
        }
        self.back_free_blocks_with_huge_pages(start, end)
    }

    /// The huge-page half of `prepare_fresh_anonymous`, which the heap always gets: it only
    /// grows at its end, a little at a time, so each new block it reaches fills up.
    fn back_free_blocks_with_huge_pages(&self, start: u64, end: u64) -> Result<(), Errno> {
        if !self.huge_pages {
            return Ok(());
        }
        for (first, last) in self.mm.huge_blocks_only_in(start, end) {
            let fresh = self.ram.untouched_huge_blocks(first, last).map_err(|e| {
                tracing::error!(error = %e, "reading guest page residency failed");
                Errno::ENOMEM
            })?;
            for (block, block_end) in fresh {
                self.ram
                    .back_with_huge_pages(block, block_end - block)
                    .map_err(|e| {
                        tracing::error!(error = %e, "backing guest pages with huge pages failed");
                        Errno::ENOMEM
                    })?;
            }
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
                    let shared = kind == libc::MAP_SHARED;
                    if shared && prot & libc::PROT_WRITE != 0 && !file.writable() {
                        return Err(Errno::EACCES.into());
                    }
                    let view = FileView {
                        path: file.path.as_slice().into(),
                        ino: node.ino(),
                        offset,
                        shared_with: shared.then_some(*node),
                        write_back: shared && file.writable(),
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
            if high::in_window(addr) {
                // The high window holds private anonymous memory only.
                if node.is_some() || kind != libc::MAP_PRIVATE {
                    return Err(Errno::ENOMEM.into());
                }
                if flags & libc::MAP_FIXED_NOREPLACE != 0
                    && self.mm.high().overlapping(addr, end).next().is_some()
                {
                    return Err(Errno::EEXIST.into());
                }
                let change = self.mm.map_high(addr, len, prot as u32)?;
                self.apply_high(change)?;
                return Ok(addr);
            }
            addr
        } else {
            match self.mm.find_free(len, addr) {
                Ok(start) => start,
                // Address space larger than RAM has room for, set aside inaccessible (V8's
                // WebAssembly memories and their guard regions): the high window.
                Err(Errno::ENOMEM)
                    if node.is_none()
                        && kind == libc::MAP_PRIVATE
                        && prot == libc::PROT_NONE
                        && len > RESERVATION_HEADROOM =>
                {
                    return Ok(self.mm.reserve_high(len)?);
                }
                Err(e) => return Err(e.into()),
            }
        };
        let vma_kind = if node.is_some() {
            VmaKind::File
        } else {
            VmaKind::Anonymous
        };
        // Shared file bytes being replaced go to their file first, and the file gets what
        // other shared mappings of it hold before this one is filled from it.
        self.write_back_shared(None, start, start + len)?;
        if let Some(node) = node {
            self.sync_shared_to_file(node)?;
        }
        // Shared memory is a segment other processes (children) map too.
        let segment = match (kind == libc::MAP_SHARED, node) {
            (false, _) => None,
            (true, None) => Some((self.new_anonymous_segment(len)?, 0)),
            (true, Some(node)) => {
                let end = offset.checked_add(len).ok_or(Errno::EOVERFLOW)?;
                Some((self.node_segment(node, end)?, offset))
            }
        };
        let replaced = self.mm.map_fixed(Vma {
            start,
            end: start + len,
            prot: prot as u32,
            kind: vma_kind,
            shared: kind == libc::MAP_SHARED,
            reserved: node.is_none() && flags & (libc::MAP_STACK | libc::MAP_NORESERVE) != 0,
            file: file_view,
            segment,
            on_fork: OnFork::default(),
        })?;
        self.release_unmapped(&replaced)?;
        self.reuse(start, len)?;
        if let Some((id, segment_offset)) = segment {
            self.map_segment(id, start, len, segment_offset)?;
            self.forget_unused_segments();
            return Ok(start);
        }
        match node {
            Some(node) => self.populate_from_file(node, start, len, offset)?,
            // Thread stacks (MAP_STACK) are mostly untouched: Linux keeps them off huge pages
            // too. Inaccessible and unreserved mappings are address space set aside, not
            // memory about to be used.
            None if flags & (libc::MAP_STACK | libc::MAP_NORESERVE) == 0
                && prot != libc::PROT_NONE =>
            {
                self.prepare_fresh_anonymous(start, start + len)?;
            }
            None => {}
        }
        Ok(start)
    }

    pub(crate) fn sys_munmap(&mut self, addr: u64, len: u64) -> SysResult {
        if high::in_window(addr) {
            let change = self.mm.unmap_high(addr, len)?;
            self.apply_high(change)?;
            return Ok(0);
        }
        self.write_back_shared(None, addr, addr.saturating_add(len))?;
        let removed = self.mm.unmap(addr, len)?;
        self.release_unmapped(&removed)?;
        self.forget_unused_segments();
        Ok(0)
    }

    pub(crate) fn sys_mprotect(&mut self, addr: u64, len: u64, prot: u64) -> SysResult {
        if high::in_window(addr) {
            let change = self.mm.protect_high(addr, len, prot as u32)?;
            self.apply_high(change)?;
            return Ok(0);
        }
        if prot & libc::PROT_WRITE as u64 != 0 {
            self.thaw_segments_in(addr, len)?;
        }
        self.mm.protect(addr, len, prot as u32)?;
        Ok(0)
    }

    pub(crate) fn sys_madvise(&mut self, addr: u64, len: u64, advice: i32) -> SysResult {
        if !addr.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL.into());
        }
        let len = page_align_up(len).ok_or(Errno::EINVAL)?;
        if high::in_window(addr) {
            return self.madvise_high(addr, len, advice);
        }
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
            libc::MADV_WIPEONFORK => {
                // Linux allows it on private anonymous memory only.
                self.mm.advise_fork(addr, len, |v| {
                    let anonymous = v.file.is_none() && !v.shared && v.segment.is_none();
                    anonymous
                        .then_some(OnFork {
                            wipe: true,
                            ..v.on_fork
                        })
                        .ok_or(Errno::EINVAL)
                })?;
                Ok(0)
            }
            libc::MADV_KEEPONFORK => {
                self.mm.advise_fork(addr, len, |v| {
                    Ok(OnFork {
                        wipe: false,
                        ..v.on_fork
                    })
                })?;
                Ok(0)
            }
            libc::MADV_DONTFORK | libc::MADV_DOFORK => {
                let skip = advice == libc::MADV_DONTFORK;
                self.mm
                    .advise_fork(addr, len, |v| Ok(OnFork { skip, ..v.on_fork }))?;
                Ok(0)
            }
            _ => Ok(0),
        }
    }

    /// `madvise` in the high window: discarding zeroes the backing; the rest is advice
    /// it has no use for.
    fn madvise_high(&mut self, addr: u64, len: u64, advice: i32) -> SysResult {
        if !self.mm.is_mapped(addr, len) {
            return Err(Errno::ENOMEM.into());
        }
        if matches!(advice, libc::MADV_DONTNEED | libc::MADV_FREE) {
            // `is_mapped` guarantees `addr + len` does not overflow.
            let backing = self.mm.high().backing_of(addr, addr + len);
            self.discard(&backing)?;
        }
        Ok(0)
    }

    /// Carries out what a change to the high window did to hidden memory.
    fn apply_high(&self, change: HighChange) -> Result<(), Errno> {
        self.discard(&change.freed)?;
        for (start, end) in change.fresh {
            self.reuse(start, end - start)?;
        }
        for (start, end) in change.downgraded {
            self.ram.invalidate(start, end - start).map_err(|e| {
                tracing::error!(error = %e, "invalidating high-window backing failed");
                Errno::ENOMEM
            })?;
        }
        Ok(())
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
            self.write_back_shared(None, old + new_len, old + old_len)?;
            let removed = self.mm.unmap(old + new_len, old_len - new_len);
            if let Ok(removed) = removed {
                self.release_unmapped(&removed)?;
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
            self.reuse(tail, grow)?;
            if anonymous {
                self.prepare_fresh_anonymous(tail, tail_end)?;
            }
            return Ok(old);
        }
        if flags & libc::MREMAP_MAYMOVE == 0 {
            return Err(Errno::ENOMEM.into());
        }
        let target = self.mm.find_free(new_len, 0)?;
        self.mm.map_fixed(grown(target, target + new_len))?;
        self.reuse(target, new_len)?;
        self.ram.move_pages(old, target, old_len).map_err(|e| {
            tracing::error!(error = %e, "moving guest pages failed");
            Errno::ENOMEM
        })?;
        // The old range is already zero (move_pages leaves zero pages behind).
        self.mm.unmap(old, old_len)?;
        if anonymous {
            self.prepare_fresh_anonymous(target + old_len, target + new_len)?;
        }
        Ok(target)
    }
}
