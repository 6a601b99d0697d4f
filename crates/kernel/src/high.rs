//! Address space above guest RAM: the high window.
//!
//! Below RAM's end, virtual addresses are guest-physical ones. Some programs reserve far
//! more address space than any sandbox has RAM and touch only a little of it: V8 sets aside
//! 10 GiB for every WebAssembly memory (the memory plus guard regions that make bounds
//! checks free), of which it makes the first pages accessible. Such reservations are placed
//! here, in `[HIGH_START, HIGH_END)`. A high page the program makes accessible is *backed*:
//! it is a guest page elsewhere, in RAM the program cannot name (a hidden mapping of the
//! address space, `VmaKind::Hidden`), and the page tables map the high address to it. Each
//! high mapping that is backed has one contiguous backing, so translating an address is an
//! offset. The page tables of the window are hidden pages too (`PageTables::sync_high`).
//!
//! What the window holds is private anonymous memory only: no files, no shared memory, no
//! `mremap`. Backing is charged to the memory limit like any memory; reservations are not.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use forkvm_memory::ram::PAGE_SIZE;

use crate::spans::{self, Span};

/// Start of the high window (1 TiB): one top-level page-table entry's worth of space.
pub const HIGH_START: u64 = 1 << 40;
/// One past its end (512 GiB later).
pub const HIGH_END: u64 = HIGH_START + (1 << 39);

/// One mapping in the high window.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HighVma {
    pub start: u64,
    pub end: u64,
    /// `PROT_*` bits as the program last set them.
    pub prot: u32,
    /// The guest-physical address backing `start`, once the mapping was ever accessible
    /// (kept while it is made inaccessible again, so its contents survive, as on Linux).
    pub backing: Option<u64>,
}

impl Span for HighVma {
    fn start(&self) -> u64 {
        self.start
    }

    fn end(&self) -> u64 {
        self.end
    }

    /// The part of this mapping inside `[start, end)` (which must overlap it), its
    /// backing moved along.
    fn piece(&self, start: u64, end: u64) -> HighVma {
        let start = start.max(self.start);
        HighVma {
            start,
            end: end.min(self.end),
            prot: self.prot,
            backing: self.backing.map(|b| b + (start - self.start)),
        }
    }
}

impl HighVma {
    /// The guest-physical address of `addr` (inside this mapping), if backed.
    pub fn physical(&self, addr: u64) -> Option<u64> {
        self.backing.map(|b| b + (addr - self.start))
    }

    pub fn readable(&self) -> bool {
        self.prot & (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u32 != 0
    }

    pub fn writable(&self) -> bool {
        self.prot & libc::PROT_WRITE as u32 != 0
    }
}

/// Whether `addr` is in the high window.
pub fn in_window(addr: u64) -> bool {
    (HIGH_START..HIGH_END).contains(&addr)
}

/// Whether `[start, start+len)` lies inside the high window.
pub fn range_in_window(start: u64, len: u64) -> bool {
    len > 0 && in_window(start) && start.checked_add(len).is_some_and(|end| end <= HIGH_END)
}

/// Page-table pages of the window: the page-directory-pointer table, directories (one per
/// GiB with backed pages) and tables (one per 2 MiB region with backed pages).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum TableKey {
    Pointers,
    /// The directory of GiB `index` of the window.
    Directory(u64),
    /// The table of 2 MiB region `index` of the window.
    Table(u64),
}

/// The high window's mappings and page-table pages.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct HighSpace {
    vmas: BTreeMap<u64, HighVma>,
    tables: BTreeMap<TableKey, u64>,
    /// Bytes mapped in the window.
    mapped: u64,
}

/// At most this much of the window may be mapped (fifty WebAssembly memories).
pub const HIGH_MAPPED_MAX: u64 = 500 << 30;

impl HighSpace {
    pub fn vmas(&self) -> impl Iterator<Item = &HighVma> {
        self.vmas.values()
    }

    pub fn mapped_bytes(&self) -> u64 {
        self.mapped
    }

    pub fn table(&self, key: TableKey) -> Option<u64> {
        self.tables.get(&key).copied()
    }

    /// Every page-table page of the window.
    pub fn tables(&self) -> impl Iterator<Item = (TableKey, u64)> + '_ {
        self.tables.iter().map(|(&k, &p)| (k, p))
    }

    pub(crate) fn set_table(&mut self, key: TableKey, page: u64) {
        self.tables.insert(key, page);
    }

    /// The lowest free, page-aligned `len` bytes of the window.
    pub fn find_gap(&self, len: u64) -> Option<u64> {
        let mut start = HIGH_START;
        for vma in self.vmas.values() {
            if vma.start >= start.checked_add(len)? {
                break;
            }
            start = start.max(vma.end);
        }
        (start.checked_add(len)? <= HIGH_END).then_some(start)
    }

    /// The mappings overlapping `[start, end)`, in address order.
    pub fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &HighVma> {
        spans::overlapping(&self.vmas, start, end)
    }

    /// True when mappings cover every byte of `[start, end)`.
    pub fn covered(&self, start: u64, end: u64) -> bool {
        let mut cursor = start;
        for vma in self.overlapping(start, end) {
            if vma.start > cursor {
                return false;
            }
            cursor = vma.end;
        }
        cursor >= end
    }

    /// Removes `[start, end)`, splitting mappings at its edges; returns the pieces removed.
    pub fn cut_out(&mut self, start: u64, end: u64) -> Vec<HighVma> {
        let removed = spans::cut_out(&mut self.vmas, start, end);
        self.mapped -= removed.iter().map(|p| p.end - p.start).sum::<u64>();
        removed
    }

    /// Inserts `vma`, whose range must be free.
    pub fn insert(&mut self, vma: HighVma) {
        self.mapped += vma.end - vma.start;
        self.vmas.insert(vma.start, vma);
    }

    /// The guest-physical pieces of `[addr, addr+len)`, if all of it is mapped with the
    /// access asked for (`write`: writable, else readable).
    pub fn translate(&self, addr: u64, len: u64, write: bool) -> Option<Vec<(u64, u64)>> {
        let end = addr.checked_add(len)?;
        if !self.covered(addr, end) {
            return None;
        }
        let mut pieces = Vec::new();
        for vma in self.overlapping(addr, end) {
            let allowed = if write {
                vma.writable()
            } else {
                vma.readable()
            };
            if !allowed {
                return None;
            }
            let (from, to) = (addr.max(vma.start), end.min(vma.end));
            pieces.push((vma.physical(from)?, to - from));
        }
        Some(pieces)
    }

    /// The guest-physical ranges backing `[start, end)` (whatever their protection).
    pub fn backing_of(&self, start: u64, end: u64) -> Vec<(u64, u64)> {
        self.overlapping(start, end)
            .filter_map(|v| {
                let (from, to) = (start.max(v.start), end.min(v.end));
                v.physical(from).map(|p| (p, p + (to - from)))
            })
            .collect()
    }

    /// The page-table entry bits and guest-physical page of each page of 2 MiB region
    /// `region` of the window (`None` for pages the program cannot reach).
    pub fn region_pages(&self, region: u64, bits: impl Fn(u32) -> u64) -> Vec<u64> {
        let base = HIGH_START + region * forkvm_memory::ram::HUGE_PAGE_SIZE;
        let end = base + forkvm_memory::ram::HUGE_PAGE_SIZE;
        let mut entries = vec![0u64; 512];
        for vma in self.overlapping(base, end) {
            let flags = bits(vma.prot);
            if flags == 0 {
                continue;
            }
            for page in (vma.start.max(base)..vma.end.min(end)).step_by(PAGE_SIZE as usize) {
                if let Some(physical) = vma.physical(page) {
                    entries[((page - base) / PAGE_SIZE) as usize] = physical | flags;
                }
            }
        }
        entries
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: u32 = (libc::PROT_READ | libc::PROT_WRITE) as u32;

    #[test]
    fn gaps_pieces_and_translation() {
        let mut high = HighSpace::default();
        let a = high.find_gap(10 << 30).unwrap();
        assert_eq!(a, HIGH_START);
        high.insert(HighVma {
            start: a,
            end: a + (10 << 30),
            prot: 0,
            backing: None,
        });
        assert_eq!(high.find_gap(1 << 20), Some(a + (10 << 30)));
        assert!(
            high.translate(a, 8, false).is_none(),
            "a reservation is not readable"
        );
        // The first two pages made accessible, backed at 0x5000_0000.
        let mut head = high.cut_out(a, a + 2 * PAGE_SIZE);
        assert_eq!(head.len(), 1);
        head[0].prot = RW;
        head[0].backing = Some(0x5000_0000);
        high.insert(head.remove(0));
        assert_eq!(high.mapped_bytes(), 10 << 30);
        assert_eq!(
            high.translate(a + PAGE_SIZE - 4, 8, true),
            Some(vec![(0x5000_0000 + PAGE_SIZE - 4, 8)])
        );
        assert!(
            high.translate(a + 2 * PAGE_SIZE - 4, 8, false).is_none(),
            "runs into the guard"
        );
        // Splitting keeps each piece's backing.
        let tail = high.cut_out(a + PAGE_SIZE, a + 2 * PAGE_SIZE);
        assert_eq!(tail[0].backing, Some(0x5000_0000 + PAGE_SIZE));
        let pages = high.region_pages(0, |p| u64::from(p != 0));
        assert_eq!(pages[0], 0x5000_0000 | 1);
        assert_eq!(pages[1], 0);
        assert!(!range_in_window(HIGH_END - PAGE_SIZE, 2 * PAGE_SIZE));
        assert!(range_in_window(HIGH_END - PAGE_SIZE, PAGE_SIZE));
    }
}
