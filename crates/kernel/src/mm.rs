//! The program's address space: which ranges of guest RAM it has mapped, with what protection.
//!
//! Virtual addresses equal guest-physical ones, so this decides where `mmap` places things,
//! whether a pointer the program hands us is valid (`EFAULT` otherwise), and how many bytes
//! count against the memory limit. Every change is also logged (`take_changes`), and the
//! process rewrites the guest page tables for those ranges (`pagetable`), which is what
//! makes the hardware enforce the mappings and their protections.

use std::collections::BTreeMap;
use std::sync::Arc;

use forkvm_image::NodeId;
use serde::{Deserialize, Serialize};
use syscalls::Errno;

use forkvm_memory::ram::{HUGE_PAGE_SIZE, PAGE_SIZE, page_align_up};

use crate::high::{self, HighSpace, HighVma, TableKey};
use crate::spans::{self, Span};

/// What backs a mapping (for accounting and diagnostics).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmaKind {
    /// Anonymous memory (zero-filled).
    Anonymous,
    /// A private copy of a file's pages.
    File,
    /// The `brk` heap.
    Heap,
    /// The main thread's stack.
    Stack,
    /// The vDSO's clock page (`[vvar]`), which the VMM keeps current.
    Vvar,
    /// The vDSO's code (`[vdso]`).
    Vdso,
    /// Memory the kernel keeps for the program where the program cannot name it: the
    /// backing of high-window pages and their page tables (`high`). Never present at its
    /// own address, never listed, never unmapped or replaced by the program.
    Hidden,
}

/// The file a mapping was made from, as `/proc/self/maps` names it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileView {
    /// The path the file was opened by.
    pub path: Arc<[u8]>,
    /// Its inode number (as `stat` reports it).
    pub ino: u64,
    /// Offset in the file of the mapping's first byte.
    pub offset: u64,
    /// For a `MAP_SHARED` mapping, the file it shares its bytes with (see
    /// `syscalls::shared`), and whether the program may write them back to it (the file was
    /// open for writing).
    pub shared_with: Option<NodeId>,
    pub write_back: bool,
}

/// One contiguous mapping `[start, end)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Vma {
    pub start: u64,
    pub end: u64,
    /// `PROT_*` bits as the program last set them.
    pub prot: u32,
    pub kind: VmaKind,
    /// Made with `MAP_SHARED` (only read-only file mappings can be).
    pub shared: bool,
    /// Address space set aside rather than memory about to be used (`MAP_STACK`, as
    /// thread stacks are, or `MAP_NORESERVE`): not charged to the memory limit, since its
    /// untouched pages cost nothing. Reservations may not use up the last
    /// `RESERVATION_HEADROOM` of the address space.
    pub reserved: bool,
    /// The file behind a `VmaKind::File` mapping.
    pub file: Option<FileView>,
    /// For a `MAP_SHARED` mapping, the shared memory segment it shows (`crate::shm`) and
    /// the segment offset of its first byte.
    #[serde(default)]
    pub segment: Option<(u64, u64)>,
    /// What a fork does with it (`madvise`).
    #[serde(default)]
    pub on_fork: OnFork,
}

impl Span for Vma {
    fn start(&self) -> u64 {
        self.start
    }

    fn end(&self) -> u64 {
        self.end
    }

    fn piece(&self, start: u64, end: u64) -> Vma {
        Vma::piece(self, start, end)
    }
}

/// What a fork does with a mapping, as `madvise` set it. A fork here is both `fork(2)` and
/// a fork of a snapshot (every sandbox of a template, every branch of a session): a
/// library that keeps secret state in `MADV_WIPEONFORK` memory (BoringSSL's fork detection,
/// for one) sees it zeroed in every fork, as it would in a forked child.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnFork {
    /// `MADV_WIPEONFORK`: the child's copy reads as zero.
    pub wipe: bool,
    /// `MADV_DONTFORK`: a `fork(2)` child does not have it. A snapshot's fork keeps it: it
    /// continues the process itself, not a child of it.
    pub skip: bool,
}

impl Vma {
    /// A private mapping with no file behind it.
    pub fn anonymous(start: u64, end: u64, prot: u32, kind: VmaKind) -> Vma {
        Vma {
            start,
            end,
            prot,
            kind,
            shared: false,
            reserved: false,
            file: None,
            segment: None,
            on_fork: OnFork::default(),
        }
    }

    /// The part of this mapping inside `[start, end)` (which must overlap it), with the file
    /// offset moved along.
    fn piece(&self, start: u64, end: u64) -> Vma {
        let start = start.max(self.start);
        let file = self.file.as_ref().map(|f| FileView {
            offset: f.offset + (start - self.start),
            ..f.clone()
        });
        let segment = self
            .segment
            .map(|(id, offset)| (id, offset + (start - self.start)));
        Vma {
            start,
            end: end.min(self.end),
            file,
            segment,
            ..self.clone()
        }
    }

    /// This mapping's attributes as they apply from `addr` (inside it) on: the file offset
    /// of `addr`.
    pub fn piece_from(&self, addr: u64) -> Vma {
        self.piece(addr, self.end)
    }

    /// Whether `next` continues this mapping seamlessly (same attributes, adjacent, and for
    /// files the next bytes of the same file): Linux shows such neighbours as one mapping.
    pub fn continues_into(&self, next: &Vma) -> bool {
        let file_continues = match (&self.file, &next.file) {
            (None, None) => true,
            (Some(a), Some(b)) => {
                a.ino == b.ino && a.path == b.path && a.offset + (self.end - self.start) == b.offset
            }
            _ => false,
        };
        let segment_continues = match (self.segment, next.segment) {
            (None, None) => true,
            (Some((a, offset)), Some((b, next_offset))) => {
                a == b && offset + (self.end - self.start) == next_offset
            }
            _ => false,
        };
        self.end == next.start
            && segment_continues
            && self.prot == next.prot
            && self.kind == next.kind
            && self.shared == next.shared
            && self.reserved == next.reserved
            && self.on_fork == next.on_fork
            && file_continues
    }
}

/// Address space that reservations (`Vma::reserved`) leave free, for the memory a program
/// uses (or an eighth of the address space, if that is less): a thousand thread stacks end
/// in `ENOMEM` (a clean `EAGAIN` from `pthread_create`) while the program can still
/// allocate.
pub const RESERVATION_HEADROOM: u64 = 64 << 20;

/// A range of guest RAM whose previous contents must be discarded (zeroed).
pub type Range = (u64, u64);

/// Fixed places in the program's address space.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Layout {
    /// Lowest address a program may map (everything below belongs to the VMM or is a guard).
    pub user_start: u64,
    /// One past the highest address (end of guest RAM).
    pub user_end: u64,
    /// Size of the main stack mapping at the top of RAM.
    pub stack_size: u64,
}

impl Layout {
    /// Lowest address of the stack mapping.
    pub fn stack_start(&self) -> u64 {
        self.user_end - self.stack_size
    }

    /// Highest address `mmap` places new mappings below (a guard gap under the stack).
    pub fn mmap_top(&self) -> u64 {
        self.stack_start() - 16 * PAGE_SIZE
    }
}

/// The set of mappings plus the `brk` heap and the memory limit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AddressSpace {
    layout: Layout,
    vmas: BTreeMap<u64, Vma>,
    brk_start: u64,
    brk: u64,
    /// Bytes mapped in all (the address space in use).
    mapped_bytes: u64,
    /// Bytes mapped that count against the limit (all but reservations).
    charged_bytes: u64,
    limit_bytes: u64,
    /// Requests refused because of `limit_bytes` (not for lack of address space).
    limit_refusals: u64,
    /// Reservations and memory above RAM (`high`).
    #[serde(default)]
    high: HighSpace,
    /// Ranges changed since the page tables were last brought up to date.
    #[serde(skip)]
    changes: Vec<Range>,
}

/// What a change to the high window did to hidden memory: `fresh` ranges were allocated
/// (they must read as zero), `freed` ones are no longer used (their pages go back).
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HighChange {
    pub fresh: Vec<Range>,
    pub freed: Vec<Range>,
    /// Backing whose high pages lost a right: KVM must forget what it mapped of them.
    pub downgraded: Vec<Range>,
}

impl AddressSpace {
    /// An empty address space with the stack mapped. `limit_bytes` caps the total mapped size.
    pub fn new(layout: Layout, limit_bytes: u64) -> Self {
        let mut space = Self {
            layout,
            vmas: BTreeMap::new(),
            brk_start: 0,
            brk: 0,
            mapped_bytes: 0,
            charged_bytes: 0,
            limit_bytes,
            limit_refusals: 0,
            high: HighSpace::default(),
            changes: Vec::new(),
        };
        let stack = Vma::anonymous(
            layout.stack_start(),
            layout.user_end,
            (libc::PROT_READ | libc::PROT_WRITE) as u32,
            VmaKind::Stack,
        );
        space.mapped_bytes = stack.end - stack.start;
        space.charged_bytes = space.mapped_bytes;
        space.changes.push((stack.start, stack.end));
        space.vmas.insert(stack.start, stack);
        space
    }

    /// The ranges whose mappings changed since the last call (the page tables need them).
    pub fn take_changes(&mut self) -> Vec<Range> {
        std::mem::take(&mut self.changes)
    }

    /// Marks all of the program's address space as changed (after a restore).
    pub fn mark_all_changed(&mut self) {
        self.changes
            .push((self.layout.user_start, self.layout.user_end));
    }

    /// The mappings overlapping `[start, end)`, in address order.
    pub fn vmas_in(&self, start: u64, end: u64) -> impl Iterator<Item = &Vma> {
        self.overlapping(start, end)
    }

    pub fn layout(&self) -> Layout {
        self.layout
    }

    /// Total bytes mapped.
    pub fn mapped_bytes(&self) -> u64 {
        self.mapped_bytes
    }

    /// Bytes mapped that the memory limit counts (all but reservations).
    pub fn charged_bytes(&self) -> u64 {
        self.charged_bytes
    }

    pub fn limit_bytes(&self) -> u64 {
        self.limit_bytes
    }

    /// Sets the cap on total mapped bytes.
    pub fn set_limit_bytes(&mut self, limit: u64) {
        self.limit_bytes = limit;
    }

    /// How many mappings or heap growths the limit refused.
    pub fn limit_refusals(&self) -> u64 {
        self.limit_refusals
    }

    /// All mappings in address order.
    pub fn vmas(&self) -> impl Iterator<Item = &Vma> {
        self.vmas.values()
    }

    /// True when every byte of `[addr, addr+len)` is mapped. Zero-length ranges are valid.
    pub fn is_mapped(&self, addr: u64, len: u64) -> bool {
        if high::in_window(addr) {
            return addr
                .checked_add(len)
                .is_some_and(|end| self.high.covered(addr, end));
        }
        self.covered(addr, len, |vma| vma.kind != VmaKind::Hidden)
    }

    /// True when every byte of `[addr, addr+len)` is mapped writable (what the kernel may
    /// write on the program's behalf, as Linux's `copy_to_user`).
    pub fn is_writable(&self, addr: u64, len: u64) -> bool {
        if high::in_window(addr) {
            return self.high.translate(addr, len, true).is_some();
        }
        self.covered(addr, len, |vma| {
            vma.kind != VmaKind::Hidden && vma.prot & libc::PROT_WRITE as u32 != 0
        })
    }

    /// The mappings a program sees (`/proc/self/maps`): all but hidden ones, then the
    /// high window's.
    pub fn visible_vmas(&self) -> impl Iterator<Item = Vma> + '_ {
        let low = self
            .vmas
            .values()
            .filter(|v| v.kind != VmaKind::Hidden)
            .cloned();
        let high = self.high.vmas().map(|h| Vma {
            reserved: true,
            ..Vma::anonymous(h.start, h.end, h.prot, VmaKind::Anonymous)
        });
        low.chain(high)
    }

    /// The high window (`high`).
    pub fn high(&self) -> &HighSpace {
        &self.high
    }

    /// True when mappings that each satisfy `ok` cover every byte of `[addr, addr+len)`.
    fn covered(&self, addr: u64, len: u64, ok: impl Fn(&Vma) -> bool) -> bool {
        if len == 0 {
            return true;
        }
        let Some(end) = addr.checked_add(len) else {
            return false;
        };
        let first = self.vmas.range(..=addr).next_back();
        let Some((_, vma)) = first else {
            return false;
        };
        if vma.end <= addr || !ok(vma) {
            return false;
        }
        let mut cursor = addr.max(vma.end);
        while cursor < end {
            match self.vmas.get(&cursor) {
                Some(next) if ok(next) => cursor = next.end,
                _ => return false,
            }
        }
        true
    }

    fn in_user_range(&self, start: u64, len: u64) -> bool {
        start >= self.layout.user_start
            && start
                .checked_add(len)
                .is_some_and(|end| end <= self.layout.user_end)
    }

    /// Bytes of existing mappings inside `[start, end)`.
    fn overlap_bytes(&self, start: u64, end: u64) -> u64 {
        self.overlapping(start, end)
            .map(|v| v.end.min(end) - v.start.max(start))
            .sum()
    }

    fn overlapping(&self, start: u64, end: u64) -> impl Iterator<Item = &Vma> {
        spans::overlapping(&self.vmas, start, end)
    }

    /// Removes `[start, end)` from the map, splitting mappings that straddle its edges, and
    /// returns the pieces that were mapped there (their pages must be discarded by the
    /// caller, unless it maps them again).
    fn cut_out(&mut self, start: u64, end: u64) -> Vec<Vma> {
        self.changes.push((start, end));
        let removed = spans::cut_out(&mut self.vmas, start, end);
        for piece in &removed {
            self.mapped_bytes -= piece.end - piece.start;
            if !piece.reserved {
                self.charged_bytes -= piece.end - piece.start;
            }
        }
        removed
    }

    /// `cut_out`, returning just the ranges.
    fn carve(&mut self, start: u64, end: u64) -> Vec<Range> {
        self.cut_out(start, end)
            .into_iter()
            .map(|v| (v.start, v.end))
            .collect()
    }

    /// Maps `vma` (page-aligned), replacing whatever was there. Returns the replaced ranges,
    /// whose old contents the caller must discard.
    pub fn map_fixed(&mut self, vma: Vma) -> Result<Vec<Range>, Errno> {
        let (start, end) = (vma.start, vma.end);
        if !start.is_multiple_of(PAGE_SIZE) || end <= start || !end.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let len = end - start;
        if !self.in_user_range(start, len) {
            return Err(Errno::ENOMEM);
        }
        // Hidden memory is the kernel's: nothing the program maps may replace it.
        if self
            .overlapping(start, end)
            .any(|v| v.kind == VmaKind::Hidden)
        {
            return Err(Errno::ENOMEM);
        }
        let overlap_charged: u64 = self
            .overlapping(start, end)
            .filter(|v| !v.reserved)
            .map(|v| v.end.min(end) - v.start.max(start))
            .sum();
        let charged = self.charged_bytes - overlap_charged + if vma.reserved { 0 } else { len };
        if charged > self.charged_bytes && charged > self.limit_bytes {
            self.limit_refusals += 1;
            return Err(Errno::ENOMEM);
        }
        let mapped = self.mapped_bytes - self.overlap_bytes(start, end) + len;
        let space = self.layout.user_end - self.layout.user_start;
        let headroom = RESERVATION_HEADROOM.min(space / 8);
        if vma.reserved && mapped > self.mapped_bytes && space.saturating_sub(mapped) < headroom {
            return Err(Errno::ENOMEM);
        }
        let replaced = self.carve(start, end);
        self.changes.push((start, end));
        self.vmas.insert(start, vma);
        self.mapped_bytes = mapped;
        self.charged_bytes = charged;
        Ok(replaced)
    }

    /// The 2 MiB blocks overlapping `[start, end)` in which nothing outside `[start, end)` is
    /// mapped, as merged ranges. Right after `[start, end)` was mapped afresh, every byte of
    /// such a block reads as zero (the rest of the block is unmapped), so its backing can be
    /// swapped for huge pages without copying anything.
    pub fn huge_blocks_only_in(&self, start: u64, end: u64) -> Vec<Range> {
        let mut blocks: Vec<Range> = Vec::new();
        let mut block = start & !(HUGE_PAGE_SIZE - 1);
        while block < end {
            let block_end = block + HUGE_PAGE_SIZE;
            let alone = block >= self.layout.user_start
                && block_end <= self.layout.user_end
                && self.overlap_bytes(block, start.max(block)) == 0
                && self.overlap_bytes(end.min(block_end), block_end) == 0;
            if alone {
                match blocks.last_mut() {
                    Some(last) if last.1 == block => last.1 = block_end,
                    _ => blocks.push((block, block_end)),
                }
            }
            block = block_end;
        }
        blocks
    }

    /// Finds a free, page-aligned range of `len` bytes: at `hint` if that range is free,
    /// otherwise the highest free range below the mmap top (the Linux top-down policy).
    pub fn find_free(&self, len: u64, hint: u64) -> Result<u64, Errno> {
        if len == 0 || !len.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let hint = hint & !(PAGE_SIZE - 1);
        if hint != 0
            && self.in_user_range(hint, len)
            && hint + len <= self.layout.mmap_top()
            && self.overlap_bytes(hint, hint + len) == 0
            && !(hint < self.brk_limit_floor() && hint + len > self.brk_start)
        {
            return Ok(hint);
        }
        // Mappings of 2 MiB or more start on a 2 MiB boundary when they can (as Linux
        // places them for transparent huge pages): their whole 2 MiB regions are then one
        // page-table entry each, which KVM maps with one fault instead of 512.
        if len >= HUGE_PAGE_SIZE
            && let Some(start) = self.find_gap(len, HUGE_PAGE_SIZE)
        {
            return Ok(start);
        }
        self.find_gap(len, PAGE_SIZE).ok_or(Errno::ENOMEM)
    }

    /// The highest `align`-aligned start of a free `len` bytes below `mmap_top`.
    fn find_gap(&self, len: u64, align: u64) -> Option<u64> {
        let fit = |lo: u64, hi: u64| {
            let start = hi.checked_sub(len)? & !(align - 1);
            (start >= lo).then_some(start)
        };
        let mut gap_end = self.layout.mmap_top();
        for vma in self.vmas.range(..gap_end).rev().map(|(_, v)| v) {
            if vma.end < gap_end
                && let Some(start) = fit(vma.end, gap_end)
            {
                return Some(start);
            }
            gap_end = gap_end.min(vma.start);
        }
        fit(self.layout.user_start, gap_end)
    }

    /// Bottom of the range the heap may grow into (hints never land inside the current heap).
    fn brk_limit_floor(&self) -> u64 {
        page_align_up(self.brk).unwrap_or(self.brk)
    }

    /// Unmaps `[start, start+len)`; returns the ranges whose pages must be discarded.
    pub fn unmap(&mut self, start: u64, len: u64) -> Result<Vec<Range>, Errno> {
        if !start.is_multiple_of(PAGE_SIZE) || len == 0 {
            return Err(Errno::EINVAL);
        }
        let len = page_align_up(len).ok_or(Errno::EINVAL)?;
        let end = start.checked_add(len).ok_or(Errno::EINVAL)?;
        // Around hidden memory, which only the kernel unmaps (`free_hidden`).
        let hidden: Vec<Range> = self
            .overlapping(start, end)
            .filter(|v| v.kind == VmaKind::Hidden)
            .map(|v| (v.start, v.end))
            .collect();
        let mut removed = Vec::new();
        let mut from = start;
        for (s, e) in hidden {
            if from < s {
                removed.extend(self.carve(from, s));
            }
            from = from.max(e);
        }
        if from < end {
            removed.extend(self.carve(from, end));
        }
        Ok(removed)
    }

    /// Changes the recorded protection of `[start, start+len)`; ENOMEM if any of it is unmapped.
    pub fn protect(&mut self, start: u64, len: u64, prot: u32) -> Result<(), Errno> {
        self.restamp(start, len, |v| Ok(Vma { prot, ..v.clone() }))
    }

    /// Sets what a fork does with `[start, start+len)` (`madvise`): ENOMEM if any of it is
    /// unmapped, EINVAL if `change` refuses one of its mappings (nothing changes then).
    pub fn advise_fork(
        &mut self,
        start: u64,
        len: u64,
        change: impl Fn(&Vma) -> Result<OnFork, Errno>,
    ) -> Result<(), Errno> {
        self.restamp(start, len, |v| {
            Ok(Vma {
                on_fork: change(v)?,
                ..v.clone()
            })
        })
    }

    /// Gives every mapping in `[start, start+len)` new attributes: `change` makes each
    /// piece's new self (same range), or refuses, and then nothing changes. ENOMEM if any of
    /// the range is unmapped.
    fn restamp(
        &mut self,
        start: u64,
        len: u64,
        change: impl Fn(&Vma) -> Result<Vma, Errno>,
    ) -> Result<(), Errno> {
        if !start.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let len = page_align_up(len).ok_or(Errno::EINVAL)?;
        if len == 0 {
            return Ok(());
        }
        if !self.is_mapped(start, len) {
            return Err(Errno::ENOMEM);
        }
        // `is_mapped` above guarantees `start + len` does not overflow.
        let end = start + len;
        let changed: Vec<Vma> = self
            .overlapping(start, end)
            .map(|v| change(&v.piece(start, end)))
            .collect::<Result<_, _>>()?;
        self.cut_out(start, end);
        for vma in changed {
            self.mapped_bytes += vma.end - vma.start;
            if !vma.reserved {
                self.charged_bytes += vma.end - vma.start;
            }
            self.vmas.insert(vma.start, vma);
        }
        Ok(())
    }

    /// The mappings whose fork advice satisfies `pick`, as ranges.
    pub fn advised_for_fork(&self, pick: impl Fn(&OnFork) -> bool) -> Vec<Range> {
        self.vmas
            .values()
            .filter(|v| pick(&v.on_fork))
            .map(|v| (v.start, v.end))
            .collect()
    }

    /// Sets where the heap begins (just past the loaded program).
    pub fn init_brk(&mut self, start: u64) {
        self.brk_start = start;
        self.brk = start;
    }

    /// Current program break.
    pub fn brk(&self) -> u64 {
        self.brk
    }

    /// Moves the program break (Linux semantics: returns the new break, or the old one when the
    /// request cannot be met). Returns the discarded ranges when the heap shrinks.
    pub fn set_brk(&mut self, requested: u64) -> (u64, Vec<Range>) {
        if requested < self.brk_start {
            return (self.brk, Vec::new());
        }
        let Some(old_top) = page_align_up(self.brk) else {
            return (self.brk, Vec::new());
        };
        let Some(new_top) = page_align_up(requested) else {
            return (self.brk, Vec::new());
        };
        if new_top > old_top {
            let grow = new_top - old_top;
            let free = self.in_user_range(old_top, grow)
                && new_top <= self.layout.mmap_top()
                && self.overlap_bytes(old_top, new_top) == 0;
            if !free {
                return (self.brk, Vec::new());
            }
            if self.charged_bytes + grow > self.limit_bytes {
                self.limit_refusals += 1;
                return (self.brk, Vec::new());
            }
            let rw = (libc::PROT_READ | libc::PROT_WRITE) as u32;
            self.changes.push((old_top, new_top));
            self.vmas
                .insert(old_top, Vma::anonymous(old_top, new_top, rw, VmaKind::Heap));
            self.mapped_bytes += grow;
            self.charged_bytes += grow;
            self.brk = requested;
            (requested, Vec::new())
        } else {
            let discarded = if new_top < old_top {
                self.carve(new_top, old_top)
            } else {
                Vec::new()
            };
            self.brk = requested;
            (requested, discarded)
        }
    }

    /// Reserves `len` bytes (inaccessible, unbacked) in the high window: for mappings
    /// larger than RAM has room for (see `high`).
    pub fn reserve_high(&mut self, len: u64) -> Result<u64, Errno> {
        if self.high.mapped_bytes().saturating_add(len) > high::HIGH_MAPPED_MAX {
            return Err(Errno::ENOMEM);
        }
        let start = self.high.find_gap(len).ok_or(Errno::ENOMEM)?;
        self.high.insert(HighVma {
            start,
            end: start + len,
            prot: 0,
            backing: None,
        });
        self.changes.push((start, start + len));
        Ok(start)
    }

    /// Maps `[start, start+len)` of the high window afresh with `prot` (`MAP_FIXED`),
    /// replacing what was there.
    pub fn map_high(&mut self, start: u64, len: u64, prot: u32) -> Result<HighChange, Errno> {
        if !high::range_in_window(start, len) || !start.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::ENOMEM);
        }
        let end = start + len;
        let replaced: u64 = self
            .high
            .overlapping(start, end)
            .map(|v| v.end.min(end) - v.start.max(start))
            .sum();
        if self.high.mapped_bytes() - replaced + len > high::HIGH_MAPPED_MAX {
            return Err(Errno::ENOMEM);
        }
        let mut change = HighChange::default();
        let backing = self.back_high(start, end, prot, &mut change)?;
        for old in self.high.cut_out(start, end) {
            self.release_backing(&old, &mut change);
        }
        self.high.insert(HighVma {
            start,
            end,
            prot,
            backing,
        });
        self.changes.push((start, end));
        Ok(change)
    }

    /// `mprotect` in the high window: ENOMEM unless all of it is mapped. Pages made
    /// accessible for the first time get backing (charged to the limit).
    pub fn protect_high(&mut self, start: u64, len: u64, prot: u32) -> Result<HighChange, Errno> {
        let len = page_align_up(len).ok_or(Errno::EINVAL)?;
        if !start.is_multiple_of(PAGE_SIZE) {
            return Err(Errno::EINVAL);
        }
        let end = start.checked_add(len).ok_or(Errno::ENOMEM)?;
        if len == 0 {
            return Ok(HighChange::default());
        }
        if !self.high.covered(start, end) {
            return Err(Errno::ENOMEM);
        }
        let mut change = HighChange::default();
        // Back every unbacked piece first, so a refusal changes nothing but what it backed.
        let unbacked: Vec<(u64, u64)> = self
            .high
            .overlapping(start, end)
            .filter(|v| v.backing.is_none())
            .map(|v| (v.start.max(start), v.end.min(end)))
            .collect();
        let mut backings = BTreeMap::new();
        for (s, e) in unbacked {
            match self.back_high(s, e, prot, &mut change) {
                Ok(backing) => {
                    backings.insert(s, (backing, e - s));
                }
                Err(error) => {
                    // Page-table pages stay (the window's tables are rewritten whole).
                    for &(backing, len) in backings.values() {
                        if let Some(backing) = backing {
                            self.free_hidden(backing, backing + len);
                        }
                    }
                    return Err(error);
                }
            }
        }
        for piece in self.high.cut_out(start, end) {
            let backing = match backings.get(&piece.start) {
                Some(&(backing, _)) => backing,
                None => piece.backing,
            };
            let kept = |bit: i32| piece.prot & bit as u32 == 0 || prot & bit as u32 != 0;
            let loses = !kept(libc::PROT_WRITE) || !kept(libc::PROT_EXEC) || !kept(libc::PROT_READ);
            if let (true, Some(from)) = (loses, piece.backing) {
                change
                    .downgraded
                    .push((from, from + (piece.end - piece.start)));
            }
            self.high.insert(HighVma {
                prot,
                backing,
                ..piece
            });
        }
        self.changes.push((start, end));
        Ok(change)
    }

    /// `munmap` in the high window.
    pub fn unmap_high(&mut self, start: u64, len: u64) -> Result<HighChange, Errno> {
        let len = page_align_up(len).ok_or(Errno::EINVAL)?;
        let end = start.checked_add(len).ok_or(Errno::EINVAL)?;
        if !start.is_multiple_of(PAGE_SIZE) || len == 0 {
            return Err(Errno::EINVAL);
        }
        let mut change = HighChange::default();
        for old in self.high.cut_out(start, end) {
            self.release_backing(&old, &mut change);
        }
        self.changes.push((start, end));
        Ok(change)
    }

    /// The guest-physical pieces of `[addr, addr+len)` in the high window, with the access
    /// asked for.
    pub fn translate_high(&self, addr: u64, len: u64, write: bool) -> Option<Vec<Range>> {
        self.high.translate(addr, len, write)
    }

    /// Backing for high `[start, end)` if `prot` makes it accessible: hidden memory, and
    /// the window's page tables over it.
    fn back_high(
        &mut self,
        start: u64,
        end: u64,
        prot: u32,
        change: &mut HighChange,
    ) -> Result<Option<u64>, Errno> {
        let accessible = prot & (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) as u32;
        if accessible == 0 {
            return Ok(None);
        }
        // The backing first: it fails at once for more than RAM has room for, before any
        // table is made for the range.
        let backing = self.alloc_hidden(end - start, change)?;
        let first = (start - high::HIGH_START) / HUGE_PAGE_SIZE;
        let last = (end - 1 - high::HIGH_START) / HUGE_PAGE_SIZE;
        let regions =
            (first..=last).flat_map(|r| [TableKey::Directory(r / 512), TableKey::Table(r)]);
        for key in std::iter::once(TableKey::Pointers).chain(regions) {
            if self.high.table(key).is_none() {
                match self.alloc_hidden(PAGE_SIZE, change) {
                    Ok(page) => self.high.set_table(key, page),
                    Err(e) => {
                        self.free_hidden(backing, backing + (end - start));
                        return Err(e);
                    }
                }
            }
        }
        Ok(Some(backing))
    }

    /// Hidden memory of `len` bytes, charged to the limit.
    fn alloc_hidden(&mut self, len: u64, change: &mut HighChange) -> Result<u64, Errno> {
        let start = self.find_free(len, 0)?;
        self.map_fixed(Vma::anonymous(start, start + len, 0, VmaKind::Hidden))?;
        change.fresh.push((start, start + len));
        Ok(start)
    }

    fn release_backing(&mut self, old: &HighVma, change: &mut HighChange) {
        if let Some(backing) = old.backing {
            let end = backing + (old.end - old.start);
            self.free_hidden(backing, end);
            change.freed.push((backing, end));
        }
    }

    /// Gives back hidden memory (backing no high mapping uses any more).
    fn free_hidden(&mut self, start: u64, end: u64) {
        self.carve(start, end);
    }

    /// The mapping containing `addr`, if any.
    pub fn vma_at(&self, addr: u64) -> Option<&Vma> {
        self.vmas
            .range(..=addr)
            .next_back()
            .map(|(_, v)| v)
            .filter(|v| v.end > addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const RW: u32 = (libc::PROT_READ | libc::PROT_WRITE) as u32;

    fn space() -> AddressSpace {
        let layout = Layout {
            user_start: 0x10_0000,
            user_end: 0x1000_0000,
            stack_size: 0x80_0000,
        };
        AddressSpace::new(layout, 0x1000_0000)
    }

    #[test]
    fn top_down_placement_and_reuse() {
        let mut s = space();
        let a = s.find_free(0x2000, 0).unwrap();
        assert_eq!(a + 0x2000, s.layout().mmap_top());
        s.map_fixed(Vma::anonymous(a, a + 0x2000, RW, VmaKind::Anonymous))
            .unwrap();
        let b = s.find_free(0x1000, 0).unwrap();
        assert_eq!(b + 0x1000, a);
        s.unmap(a, 0x2000).unwrap();
        assert_eq!(
            s.find_free(0x1000, 0).unwrap() + 0x1000,
            s.layout().mmap_top()
        );
    }

    #[test]
    fn partial_unmap_splits() {
        let mut s = space();
        s.map_fixed(Vma::anonymous(
            0x40_0000,
            0x40_0000 + 0x4000,
            RW,
            VmaKind::Anonymous,
        ))
        .unwrap();
        let removed = s.unmap(0x40_1000, 0x1000).unwrap();
        assert_eq!(removed, vec![(0x40_1000, 0x40_2000)]);
        assert!(s.is_mapped(0x40_0000, 0x1000));
        assert!(!s.is_mapped(0x40_0000, 0x2000));
        assert!(s.is_mapped(0x40_2000, 0x2000));
    }

    #[test]
    fn is_mapped_spans_adjacent_vmas() {
        let mut s = space();
        s.map_fixed(Vma::anonymous(
            0x40_0000,
            0x40_0000 + 0x1000,
            RW,
            VmaKind::Anonymous,
        ))
        .unwrap();
        s.map_fixed(Vma::anonymous(
            0x40_1000,
            0x40_1000 + 0x1000,
            RW,
            VmaKind::File,
        ))
        .unwrap();
        assert!(s.is_mapped(0x40_0800, 0x1000));
        assert!(!s.is_mapped(0x40_0800, 0x2000));
        assert!(!s.is_mapped(u64::MAX - 1, 4));
    }

    #[test]
    fn limit_is_enforced() {
        let mut s = space();
        let stack = s.mapped_bytes();
        s.limit_bytes = stack + 0x2000;
        assert!(
            s.map_fixed(Vma::anonymous(
                0x40_0000,
                0x40_0000 + 0x2000,
                RW,
                VmaKind::Anonymous
            ))
            .is_ok()
        );
        assert_eq!(
            s.map_fixed(Vma::anonymous(
                0x50_0000,
                0x50_0000 + 0x1000,
                RW,
                VmaKind::Anonymous
            )),
            Err(Errno::ENOMEM)
        );
        // Replacing an existing mapping does not grow the total.
        assert!(
            s.map_fixed(Vma::anonymous(
                0x40_0000,
                0x40_0000 + 0x1000,
                RW,
                VmaKind::File
            ))
            .is_ok()
        );
    }

    #[test]
    fn brk_grows_and_shrinks() {
        let mut s = space();
        s.init_brk(0x60_0123);
        assert_eq!(s.set_brk(0x60_5000).0, 0x60_5000);
        assert!(s.is_mapped(0x60_1000, 0x4000));
        let (now, discarded) = s.set_brk(0x60_2000);
        assert_eq!(now, 0x60_2000);
        assert_eq!(discarded, vec![(0x60_2000, 0x60_5000)]);
        assert_eq!(s.set_brk(0x10).0, 0x60_2000);
        s.map_fixed(Vma::anonymous(
            0x70_0000,
            0x70_0000 + 0x1000,
            RW,
            VmaKind::Anonymous,
        ))
        .unwrap();
        assert_eq!(s.set_brk(0x80_0000).0, 0x60_2000);
    }

    #[test]
    fn protect_requires_mapping() {
        let mut s = space();
        s.map_fixed(Vma::anonymous(
            0x40_0000,
            0x40_0000 + 0x3000,
            RW,
            VmaKind::Anonymous,
        ))
        .unwrap();
        s.protect(0x40_1000, 0x1000, 0).unwrap();
        assert_eq!(s.vma_at(0x40_1000).unwrap().prot, 0);
        assert_eq!(s.vma_at(0x40_2000).unwrap().prot, RW);
        assert_eq!(s.protect(0x40_2000, 0x2000, 0), Err(Errno::ENOMEM));
    }

    #[test]
    fn huge_blocks_are_those_nothing_else_maps() {
        const HUGE: u64 = HUGE_PAGE_SIZE;
        let mut s = space();
        // A neighbour in the block below the range, none above it.
        s.map_fixed(Vma::anonymous(
            4 * HUGE - 0x1000,
            4 * HUGE,
            RW,
            VmaKind::Anonymous,
        ))
        .unwrap();
        let (start, end) = (4 * HUGE + 0x3000, 8 * HUGE + 0x5000);
        s.map_fixed(Vma::anonymous(start, end, RW, VmaKind::Anonymous))
            .unwrap();
        // The block holding `start` is free apart from the range (the neighbour ends at its
        // base); the partial block at the end has nothing else in it either.
        assert_eq!(
            s.huge_blocks_only_in(start, end),
            vec![(4 * HUGE, 9 * HUGE)]
        );
        s.map_fixed(Vma::anonymous(
            9 * HUGE - 0x1000,
            9 * HUGE,
            RW,
            VmaKind::Anonymous,
        ))
        .unwrap();
        assert_eq!(
            s.huge_blocks_only_in(start, end),
            vec![(4 * HUGE, 8 * HUGE)]
        );
        // Blocks reaching below the user range (the system area) never qualify.
        assert!(s.huge_blocks_only_in(0x10_0000, 0x18_0000).is_empty());
    }

    #[test]
    fn split_file_mappings_keep_their_offsets() {
        let mut s = space();
        let file = FileView {
            path: b"/lib/x.so".as_slice().into(),
            ino: 9,
            offset: 0x1000,
            shared_with: None,
            write_back: false,
        };
        s.map_fixed(Vma {
            file: Some(file),
            ..Vma::anonymous(0x40_0000, 0x40_4000, RW, VmaKind::File)
        })
        .unwrap();
        s.protect(0x40_1000, 0x1000, 0).unwrap();
        let offsets: Vec<u64> = s
            .vmas()
            .filter_map(|v| v.file.as_ref().map(|f| f.offset))
            .collect();
        assert_eq!(offsets, vec![0x1000, 0x2000, 0x3000]);
        let vmas: Vec<&Vma> = s.vmas().collect();
        assert!(!vmas[0].continues_into(vmas[1]), "protection differs");
        s.protect(0x40_1000, 0x1000, RW).unwrap();
        let vmas: Vec<&Vma> = s.vmas().collect();
        assert!(vmas[0].continues_into(vmas[1]) && vmas[1].continues_into(vmas[2]));
    }

    #[test]
    fn reservations_are_not_charged_but_leave_headroom() {
        let mut s = space();
        s.limit_bytes = s.charged_bytes() + 0x10_0000;
        let reserve = |start: u64, len: u64| Vma {
            reserved: true,
            ..Vma::anonymous(start, start + len, RW, VmaKind::Anonymous)
        };
        // 16 MiB of thread stack under a 1 MiB limit: address space, not memory.
        s.map_fixed(reserve(0x100_0000, 0x100_0000)).unwrap();
        assert_eq!(s.charged_bytes(), s.mapped_bytes() - 0x100_0000);
        s.map_fixed(Vma::anonymous(0x40_0000, 0x50_0000, RW, VmaKind::Anonymous))
            .unwrap();
        assert_eq!(
            s.map_fixed(Vma::anonymous(0x60_0000, 0x60_1000, RW, VmaKind::Anonymous)),
            Err(Errno::ENOMEM),
            "the limit still holds for the rest"
        );
        // Reservations stop short of the last eighth of the address space.
        let space = s.layout().user_end - s.layout().user_start;
        let free = space - s.mapped_bytes();
        let too_much = free - space / 8 + 0x1000;
        assert_eq!(
            s.map_fixed(reserve(0x300_0000, too_much & !0xfff)),
            Err(Errno::ENOMEM)
        );
        s.unmap(0x100_0000, 0x100_0000).unwrap();
        assert_eq!(s.charged_bytes(), s.mapped_bytes());
    }

    #[test]
    fn rejects_outside_user_range() {
        let mut s = space();
        assert_eq!(
            s.map_fixed(Vma::anonymous(
                0x1000,
                0x1000 + 0x1000,
                RW,
                VmaKind::Anonymous
            )),
            Err(Errno::ENOMEM)
        );
        assert_eq!(
            s.map_fixed(Vma::anonymous(
                0x1000_0000,
                0x1000_0000 + 0x1000,
                RW,
                VmaKind::Anonymous
            )),
            Err(Errno::ENOMEM)
        );
    }
}
