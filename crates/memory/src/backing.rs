//! What a fork's guest RAM is a copy-on-write view of: a snapshot's memory file, plus, for a
//! fork of a fork, layers of the pages each generation changed.
//!
//! Two operations depend on knowing exactly which pages differ from the backing:
//! * **Reset** (`GuestRam::reset_to`): a pooled VM warmed by a request of our own goes back
//!   to byte-for-byte the snapshot. Private pages get their backing bytes copied back in
//!   place (they stay mapped in KVM's shadow page tables, which is the point of warming);
//!   ranges whose host mapping was replaced are mapped from the backing again.
//! * **Layering** (`GuestRam::changed_ranges`): snapshotting a parked fork stores only its
//!   changed pages over its parent's backing.
//!
//! A page differs from the backing only if it is a private copy (present without the file
//! flag in `/proc/self/pagemap`) or lies in a range whose host mapping was replaced
//! (`discard`, `map_file`, `move_pages`, all logged). Tests compare every page to check this.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::{Arc, OnceLock};

use rangemap::RangeSet;

use crate::ram::{GuestRam, HUGE_PAGE_SIZE, MemoryError, PAGE_SIZE};

/// `/proc/self/pagemap` flag: the page is present in RAM.
const PM_PRESENT: u64 = 1 << 63;
/// `/proc/self/pagemap` flag: a file page (shared with the page cache). A present page without
/// it, in a private file mapping, is a private copy.
const PM_FILE: u64 = 1 << 61;
/// `/proc/self/pagemap`: the page is swapped out.
const PM_SWAPPED: u64 = 1 << 62;
/// Pagemap entries read per call.
const PAGEMAP_BATCH: usize = 512;

/// Pages of one generation that override the layers below, at their own guest offsets.
#[derive(Debug, Clone)]
pub struct Layer {
    pub file: Arc<File>,
    /// Sorted, disjoint guest ranges this layer provides (holes in the file read as zero).
    pub ranges: Vec<(u64, u64)>,
}

/// A snapshot's memory: a base file the size of guest RAM, and layers on top.
#[derive(Debug, Clone)]
pub struct Backing {
    pub base: Arc<File>,
    pub layers: Vec<Layer>,
    /// Locked views that keep the base file's data resident (see `Pin`).
    pub pins: Vec<Arc<Pin>>,
}

impl Backing {
    /// A backing with no layers.
    pub fn file(base: File) -> Backing {
        Backing {
            base: Arc::new(base),
            layers: Vec::new(),
            pins: Vec::new(),
        }
    }

    /// Locks the base file's data `extents` in memory. The host may otherwise reclaim
    /// page-cache pages no fork touched for a while (our machines run DAMON with a pageout
    /// scheme), and every fork would then wait for the disk. Best effort: a failure to lock
    /// (no `CAP_IPC_LOCK`, limits) is returned for the caller to log, and forks still work.
    pub fn pin(&mut self, extents: &[(u64, u64)]) -> Result<(), MemoryError> {
        for &(offset, len) in extents {
            self.pins.push(Arc::new(Pin::new(&self.base, offset, len)?));
        }
        Ok(())
    }

    /// The file holding the bytes of the page at `addr`: the topmost layer that has it.
    fn source_of(&self, addr: u64) -> &File {
        self.layers
            .iter()
            .rev()
            .find(|layer| contains(&layer.ranges, addr))
            .map_or(&self.base, |layer| &layer.file)
    }

    /// Reads the backing bytes of the page at `addr` into `page`.
    pub fn read_page(&self, addr: u64, page: &mut [u8]) -> Result<(), MemoryError> {
        self.source_of(addr)
            .read_exact_at(page, addr)
            .map_err(MemoryError::Remap)
    }

    /// Maps `[start, end)` of the backing over the same guest range of `ram`.
    fn map_range(&self, ram: &GuestRam, start: u64, end: u64) -> Result<(), MemoryError> {
        ram.map_backing(start, end - start, &self.base)?;
        for layer in &self.layers {
            for &(s, e) in &layer.ranges {
                let (s, e) = (s.max(start), e.min(end));
                if s < e {
                    ram.map_backing(s, e - s, &layer.file)?;
                }
            }
        }
        Ok(())
    }
}

/// A locked, read-only shared view of part of a file: its pages stay in the page cache.
#[derive(Debug)]
pub struct Pin {
    addr: *mut libc::c_void,
    len: usize,
}

// SAFETY: the view is read-only and only ever unmapped in Drop; nothing reads through it.
unsafe impl Send for Pin {}
// SAFETY: as above; no access through the pointer at all.
unsafe impl Sync for Pin {}

impl Pin {
    fn new(file: &File, offset: u64, len: u64) -> Result<Pin, MemoryError> {
        use std::os::fd::AsRawFd;
        if len == 0 || !offset.is_multiple_of(PAGE_SIZE) {
            return Err(MemoryError::BadRange { addr: offset, len });
        }
        let len = len as usize;
        // SAFETY: a new shared read-only mapping at a kernel-chosen address; it aliases no
        // Rust object and is never written.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(MemoryError::Remap(std::io::Error::last_os_error()));
        }
        let pin = Pin { addr, len };
        // SAFETY: `addr..addr+len` is the mapping just created.
        if unsafe { libc::mlock(addr, len) } != 0 {
            return Err(MemoryError::Remap(std::io::Error::last_os_error()));
        }
        Ok(pin)
    }
}

impl Drop for Pin {
    fn drop(&mut self) {
        // SAFETY: the mapping was created in `new`, is owned by `self`, and nothing refers to
        // memory inside it.
        unsafe { libc::munmap(self.addr, self.len) };
    }
}

/// Whether sorted, disjoint `ranges` contain `addr`.
fn contains(ranges: &[(u64, u64)], addr: u64) -> bool {
    let i = ranges.partition_point(|&(_, end)| end <= addr);
    ranges.get(i).is_some_and(|&(start, _)| start <= addr)
}

/// Sorts and merges overlapping or touching ranges.
pub fn merge_ranges(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.sort_unstable();
    let mut merged: Vec<(u64, u64)> = Vec::with_capacity(ranges.len());
    for (start, end) in ranges {
        match merged.last_mut() {
            Some(last) if start <= last.1 => last.1 = last.1.max(end),
            _ => merged.push((start, end)),
        }
    }
    merged
}

/// Opens this process's page map now, for the rest of its life: a jailed worker does this
/// before it leaves `/proc` (and its privileges) behind.
pub fn open_pagemap() -> Result<(), MemoryError> {
    pagemap().map(|_| ())
}

fn pagemap() -> Result<&'static File, MemoryError> {
    static PAGEMAP: OnceLock<File> = OnceLock::new();
    if let Some(file) = PAGEMAP.get() {
        return Ok(file);
    }
    let file = File::open("/proc/self/pagemap").map_err(MemoryError::Remap)?;
    Ok(PAGEMAP.get_or_init(|| file))
}

/// Host residency of a range of guest pages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Residency {
    /// Pages in host memory (touched by the guest, or by the VMM on its behalf).
    pub resident_pages: u64,
    /// Of those, the sandbox's own: anonymous pages and private copies of file pages. The
    /// rest are file pages shared with the page cache, the snapshot and other sandboxes.
    pub private_pages: u64,
}

/// How much a duplicate copies at a time.
const COPY_CHUNK: u64 = 1 << 20;

/// What a reset did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ResetStats {
    /// Private pages whose backing bytes were copied back.
    pub restored_pages: u64,
    /// Bytes of ranges mapped from the backing again.
    pub remapped_bytes: u64,
}

impl GuestRam {
    /// Maps `backing` copy-on-write: the base file, then each layer's ranges over it.
    pub fn from_backing(backing: &Backing, size: u64) -> Result<GuestRam, MemoryError> {
        let mut ram = GuestRam::private_file(&backing.base, size)?;
        ram.origin = Some(backing.clone());
        for layer in &backing.layers {
            for &(start, end) in &layer.ranges {
                ram.map_backing(start, end - start, &layer.file)?;
            }
        }
        Ok(ram)
    }

    /// Calls `visit(guest_address, pagemap_entry)` for each page of `[start, end)` (page
    /// aligned, inside RAM), from the host's `/proc/self/pagemap`.
    pub(crate) fn walk_pagemap(
        &self,
        start: u64,
        end: u64,
        mut visit: impl FnMut(u64, u64),
    ) -> Result<(), MemoryError> {
        if end > self.size() || start > end {
            return Err(MemoryError::BadRange {
                addr: start,
                len: end.saturating_sub(start),
            });
        }
        let pagemap = pagemap()?;
        let mut entries = vec![0u8; PAGEMAP_BATCH * 8];
        let mut addr = start;
        while addr < end {
            let count = ((end - addr) / PAGE_SIZE).min(PAGEMAP_BATCH as u64) as usize;
            let host_page = (self.host_base as u64 + addr) / PAGE_SIZE;
            pagemap
                .read_exact_at(&mut entries[..count * 8], host_page * 8)
                .map_err(MemoryError::Remap)?;
            for (i, entry) in entries[..count * 8].chunks_exact(8).enumerate() {
                let flags = u64::from_le_bytes(entry.try_into().expect("8 bytes"));
                visit(addr + i as u64 * PAGE_SIZE, flags);
            }
            addr += count as u64 * PAGE_SIZE;
        }
        Ok(())
    }

    /// A private copy of what `ranges` (page aligned) hold, in new RAM of the same size: a
    /// forked process's memory, copying as little as it can. RAM that is a view of a
    /// snapshot is copied as a new view of the same snapshot; files mapped copy-on-write
    /// (`map_file`: shared libraries, the program) are mapped again the same way; only the
    /// pages this RAM made its own (written, or anonymous and touched) are copied. A range
    /// mapped from anything else is copied whole.
    pub fn duplicate(&self, ranges: &[(u64, u64)]) -> Result<GuestRam, MemoryError> {
        for &(start, end) in ranges {
            if start >= end || end > self.size() {
                return Err(MemoryError::BadRange {
                    addr: start,
                    len: end.saturating_sub(start),
                });
            }
        }
        let copy = match &self.origin {
            Some(origin) => GuestRam::from_backing(origin, self.size())?,
            None => GuestRam::anonymous(self.size())?,
        };
        // Where this RAM no longer shows its origin (all of it, without one).
        let remapped: RangeSet<u64> = match &self.origin {
            Some(_) => self
                .remapped
                .lock()
                .expect("remap log lock")
                .iter()
                .filter(|(s, e)| s < e)
                .map(|&(s, e)| s..e)
                .collect(),
            None => std::iter::once(0..self.size()).collect(),
        };
        let anonymous = self
            .host_pages
            .lock()
            .expect("host pages lock")
            .anonymous()
            .clone();
        let file_maps = self.file_maps.lock().expect("file maps lock").clone();
        // Pages whose bytes must be written, and where the copy already reads as zero (so a
        // page of zeros there need not be).
        let mut runs: Vec<(u64, u64)> = Vec::new();
        let mut zeroed: RangeSet<u64> = RangeSet::new();
        for &(start, end) in ranges {
            self.walk_pagemap(start, end, |addr, flags| {
                if flags & (PM_PRESENT | PM_SWAPPED) != 0 && flags & PM_FILE == 0 {
                    match runs.last_mut() {
                        Some(last) if last.1 == addr => last.1 = addr + PAGE_SIZE,
                        _ => runs.push((addr, addr + PAGE_SIZE)),
                    }
                }
            })?;
            for piece in remapped.overlapping(&(start..end)) {
                let (from, to) = (piece.start.max(start), piece.end.min(end));
                for (mapped, map) in file_maps.overlapping(&(from..to)) {
                    let (a, b) = (mapped.start.max(from), mapped.end.min(to));
                    let offset = u64::try_from(i128::from(a) + map.delta).map_err(|_| {
                        MemoryError::BadRange {
                            addr: a,
                            len: b - a,
                        }
                    })?;
                    copy.map_file(a, b - a, &map.file, offset)?;
                }
                for gap in file_maps.gaps(&(from..to)) {
                    if self.origin.is_some() {
                        copy.discard(gap.start, gap.end - gap.start)?;
                    }
                    zeroed.insert(gap.clone());
                    // Mapped from a file we cannot map again: copy all of it.
                    for file in anonymous.gaps(&gap) {
                        runs.push((file.start, file.end));
                    }
                }
            }
        }
        let mut buf = vec![0u8; COPY_CHUNK as usize];
        let out_of_bounds = |e: crate::ram::OutOfBounds| MemoryError::BadRange {
            addr: e.addr,
            len: e.len,
        };
        for (start, end) in merge_ranges(runs) {
            let mut at = start;
            while at < end {
                let len = (end - at).min(COPY_CHUNK);
                let chunk = &mut buf[..len as usize];
                self.read(at, chunk).map_err(out_of_bounds)?;
                for (i, page) in chunk.chunks_exact(PAGE_SIZE as usize).enumerate() {
                    let addr = at + i as u64 * PAGE_SIZE;
                    if zeroed.contains(&addr) && page.iter().all(|&b| b == 0) {
                        continue;
                    }
                    copy.write(addr, page).map_err(out_of_bounds)?;
                }
                at += len;
            }
        }
        Ok(copy)
    }

    /// The snapshot this RAM is a copy-on-write view of, if it is one.
    pub fn origin(&self) -> Option<&Backing> {
        self.origin.as_ref()
    }

    /// Guest addresses of the private (copied-on-write) pages, in order: present or
    /// swapped out, and not the page cache's.
    pub fn private_pages(&self) -> Result<Vec<u64>, MemoryError> {
        self.private_pages_in(&[(0, self.size())])
    }

    /// `private_pages` within what the guest can reach (`reach`): all a VM over this RAM
    /// can have written, since it reaches nothing else and the syscall layer writes only
    /// what the program mapped (each mapping noted in `reach`). Reading the host's page map
    /// costs per page asked about, and this asks about an eighth of a Python fork's RAM.
    pub fn reachable_private_pages(&self) -> Result<Vec<u64>, MemoryError> {
        self.private_pages_in(&self.reach().ranges(self.size()))
    }

    /// `private_pages` within `ranges` (sorted, page aligned, inside RAM).
    fn private_pages_in(&self, ranges: &[(u64, u64)]) -> Result<Vec<u64>, MemoryError> {
        let mut pages = Vec::new();
        for &(start, end) in ranges {
            self.walk_pagemap(start, end, |addr, flags| {
                if flags & (PM_PRESENT | PM_SWAPPED) != 0 && flags & PM_FILE == 0 {
                    pages.push(addr);
                }
            })?;
        }
        Ok(pages)
    }

    /// The 2 MiB blocks of `[start, end)` (2 MiB aligned) with no page resident on the host,
    /// as merged ranges.
    pub fn untouched_huge_blocks(
        &self,
        start: u64,
        end: u64,
    ) -> Result<Vec<(u64, u64)>, MemoryError> {
        let mut touched = Vec::new();
        self.walk_pagemap(start, end, |addr, flags| {
            let block = addr & !(HUGE_PAGE_SIZE - 1);
            if flags & PM_PRESENT != 0 && touched.last() != Some(&block) {
                touched.push(block);
            }
        })?;
        let mut blocks: Vec<(u64, u64)> = Vec::new();
        for block in (start..end).step_by(HUGE_PAGE_SIZE as usize) {
            if touched.binary_search(&block).is_ok() {
                continue;
            }
            match blocks.last_mut() {
                Some(last) if last.1 == block => last.1 = block + HUGE_PAGE_SIZE,
                _ => blocks.push((block, block + HUGE_PAGE_SIZE)),
            }
        }
        Ok(blocks)
    }

    /// Which pages of `[start, end)` (page aligned) are resident on the host, and whose.
    pub fn residency(&self, start: u64, end: u64) -> Result<Residency, MemoryError> {
        let mut residency = Residency::default();
        self.walk_pagemap(start, end, |_, flags| {
            if flags & PM_PRESENT != 0 {
                residency.resident_pages += 1;
                if flags & PM_FILE == 0 {
                    residency.private_pages += 1;
                }
            }
        })?;
        Ok(residency)
    }

    /// Ranges (sorted, merged) that may differ from the backing this RAM was mapped from:
    /// private pages and replaced ranges.
    pub fn changed_ranges(&self) -> Result<Vec<(u64, u64)>, MemoryError> {
        let mut ranges: Vec<(u64, u64)> = self
            .private_pages()?
            .into_iter()
            .map(|page| (page, page + PAGE_SIZE))
            .collect();
        ranges.extend(
            self.remapped
                .lock()
                .expect("remap log lock")
                .iter()
                .copied(),
        );
        Ok(merge_ranges(ranges))
    }

    /// Makes every page equal to `backing` again (the backing this RAM was mapped from).
    pub fn reset_to(&self, backing: &Backing) -> Result<ResetStats, MemoryError> {
        let private = self.private_pages()?;
        self.reset_with(backing, &private)
    }

    /// `reset_to`, given the private pages (from `private_pages`, with nothing run since).
    pub fn reset_with(
        &self,
        backing: &Backing,
        private: &[u64],
    ) -> Result<ResetStats, MemoryError> {
        let mut stats = ResetStats::default();
        // What was mapped anew is the backing's again below: no file stays mapped.
        self.file_maps.lock().expect("file maps lock").clear();
        let remapped = merge_ranges(std::mem::take(
            &mut *self.remapped.lock().expect("remap log lock"),
        ));
        for &(start, end) in &remapped {
            backing.map_range(self, start, end)?;
            stats.remapped_bytes += end - start;
        }
        let mut page = vec![0u8; PAGE_SIZE as usize];
        // Pages inside a remapped range are the backing's again already: copying them would
        // only make fresh private copies (a 100 MiB array is 25,600 of them).
        for &addr in private.iter().filter(|&&addr| !contains(&remapped, addr)) {
            backing.read_page(addr, &mut page)?;
            self.write(addr, &page).map_err(|_| MemoryError::BadRange {
                addr,
                len: PAGE_SIZE,
            })?;
            stats.restored_pages += 1;
        }
        self.host_pages.lock().expect("host pages lock").forget();
        Ok(stats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn merges_and_finds_ranges() {
        let merged = merge_ranges(vec![(8, 12), (0, 4), (4, 6), (20, 30), (10, 14)]);
        assert_eq!(merged, vec![(0, 6), (8, 14), (20, 30)]);
        assert!(contains(&merged, 0) && contains(&merged, 13) && contains(&merged, 29));
        assert!(!contains(&merged, 6) && !contains(&merged, 14) && !contains(&merged, 30));
    }

    fn file_with(pages: &[(u64, u8)], size: u64) -> File {
        let file = tempfile::tempfile().unwrap();
        file.set_len(size).unwrap();
        for &(addr, byte) in pages {
            file.write_all_at(&vec![byte; PAGE_SIZE as usize], addr)
                .unwrap();
        }
        file
    }

    fn byte_at(ram: &GuestRam, addr: u64) -> u8 {
        let mut b = [0u8; 1];
        ram.read(addr, &mut b).unwrap();
        b[0]
    }

    #[test]
    fn a_duplicate_holds_what_the_original_showed_and_nothing_it_does_later() {
        let size = 32 * PAGE_SIZE;
        let file = Arc::new(file_with(
            &[(0, 1), (PAGE_SIZE, 2), (2 * PAGE_SIZE, 3)],
            4 * PAGE_SIZE,
        ));
        for origin in [
            None,
            Some(Backing::file(file_with(&[(8 * PAGE_SIZE, 9)], size))),
        ] {
            let ram = match &origin {
                Some(backing) => GuestRam::from_backing(backing, size).unwrap(),
                None => GuestRam::anonymous(size).unwrap(),
            };
            // A file mapped copy-on-write, one of its pages written; anonymous pages written
            // (one with zeros over the snapshot's bytes); the snapshot's page untouched.
            ram.map_file(4 * PAGE_SIZE, 3 * PAGE_SIZE, &file, 0)
                .unwrap();
            ram.write(5 * PAGE_SIZE, &[7]).unwrap();
            ram.write(12 * PAGE_SIZE, &[5]).unwrap();
            ram.discard(9 * PAGE_SIZE, PAGE_SIZE).unwrap();
            let copy = ram.duplicate(&[(0, size)]).unwrap();
            ram.write(4 * PAGE_SIZE, &[42]).unwrap();
            assert_eq!(byte_at(&copy, 4 * PAGE_SIZE), 1, "the file's page");
            assert_eq!(byte_at(&copy, 5 * PAGE_SIZE), 7, "the written page");
            assert_eq!(byte_at(&copy, 5 * PAGE_SIZE + 1), 2);
            assert_eq!(byte_at(&copy, 6 * PAGE_SIZE), 3);
            assert_eq!(byte_at(&copy, 12 * PAGE_SIZE), 5);
            assert_eq!(byte_at(&copy, 9 * PAGE_SIZE), 0, "discarded reads zero");
            let snapshot_byte = if origin.is_some() { 9 } else { 0 };
            assert_eq!(byte_at(&copy, 8 * PAGE_SIZE), snapshot_byte);
        }
    }

    #[test]
    fn layers_override_the_base_and_reset_restores_them() {
        let size = 16 * PAGE_SIZE;
        let base = file_with(&[(0, 1), (PAGE_SIZE, 1), (2 * PAGE_SIZE, 1)], size);
        let layer = file_with(&[(PAGE_SIZE, 2)], size);
        let mut backing = Backing {
            base: Arc::new(base),
            layers: vec![Layer {
                file: Arc::new(layer),
                ranges: vec![(PAGE_SIZE, 3 * PAGE_SIZE)],
            }],
            pins: Vec::new(),
        };
        backing.pin(&[(0, 3 * PAGE_SIZE)]).unwrap();
        let ram = GuestRam::from_backing(&backing, size).unwrap();
        // Page 2 is in the layer's range but a hole there: zero, not the base's 1.
        assert_eq!([0, 1, 2].map(|p| byte_at(&ram, p * PAGE_SIZE)), [1, 2, 0]);
        assert!(ram.changed_ranges().unwrap().is_empty());

        ram.write(5, &[9]).unwrap();
        ram.write(PAGE_SIZE + 5, &[9]).unwrap();
        ram.discard(2 * PAGE_SIZE, PAGE_SIZE).unwrap();
        ram.write(2 * PAGE_SIZE, &[7]).unwrap();
        assert_eq!(ram.changed_ranges().unwrap(), vec![(0, 3 * PAGE_SIZE)]);
        let residency = ram.residency(0, 3 * PAGE_SIZE).unwrap();
        assert_eq!(residency.resident_pages, 3);
        assert_eq!(residency.private_pages, 3);
        let stats = ram.reset_to(&backing).unwrap();
        assert_eq!(stats.remapped_bytes, PAGE_SIZE);
        // Page 2 was in the remapped range: mapping it back restored it, no copy needed.
        assert_eq!(stats.restored_pages, 2);
        assert_eq!(byte_at(&ram, 5), 1);
        assert_eq!(byte_at(&ram, PAGE_SIZE + 5), 2);
        assert_eq!(byte_at(&ram, 2 * PAGE_SIZE), 0);
    }
}
