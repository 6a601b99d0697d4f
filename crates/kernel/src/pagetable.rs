//! Guest page tables that tell the truth: a page is present only while the program has it
//! mapped, writable only with `PROT_WRITE`, executable only with `PROT_EXEC` (NX).
//!
//! Virtual addresses still equal guest-physical ones; what the tables decide is which pages
//! the program may touch and how. The VMM writes the fixed part once (`build_fixed`): the
//! top levels and the first 2 MiB, where the system area lives. After every syscall that
//! changed the address space, `sync` rewrites the entries of the 2 MiB regions it touched
//! from the mappings. A region mapped whole with one protection is one 2 MiB entry (so KVM
//! can map it with one fault); a region mapped in part gets a 4 KiB table from a pool at
//! the top of guest RAM, outside every mapping, so the program can never reach a table.
//!
//! Why no TLB flush: the tables are written from the host, which KVM's shadow MMU on
//! kvm_pvm does not notice (its shadows follow guest writes, `mov cr3` and `invlpg`, none
//! of which the host makes). Adding rights needs nothing: a shadow entry that allows less
//! than the guest tables faults, and KVM then reads the tables again. Removing rights needs
//! KVM to drop its shadow entries for those pages: changing the host mapping of a page
//! does that (the MMU notifier), so `sync` returns the ranges that lost rights and the
//! caller toggles their host protection (`GuestRam::invalidate`), or has already replaced
//! their host pages.

use crate::mm::AddressSpace;
use forkvm_memory::ram::{GuestRam, HUGE_PAGE_SIZE, OutOfBounds, PAGE_SIZE};

/// Page-map level 4 table.
pub const PML4: u64 = 0x1_0000;
/// Page-directory-pointer table (one entry per GiB of RAM).
pub const PDPT: u64 = 0x1_1000;
/// The 4 KiB table of the first 2 MiB (system area below `user_start`, program above).
pub const LOW_PAGE_TABLE: u64 = 0x1_2000;
/// Page directories, one page per GiB of RAM.
pub const PAGE_DIRECTORIES: u64 = 0x2_0000;

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const ACCESSED: u64 = 1 << 5;
const DIRTY: u64 = 1 << 6;
const HUGE: u64 = 1 << 7;
const NO_EXECUTE: u64 = 1 << 63;
/// A table entry pointing at a lower-level table: the lower level decides.
const TABLE: u64 = PRESENT | WRITABLE | USER;
const ENTRIES: u64 = 512;
const ONE_GIB: u64 = 1 << 30;

/// Where the tables of a guest of a given RAM size live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageTables {
    ram_size: u64,
    /// Start of the pool of 4 KiB tables: one page per 2 MiB region, top of RAM.
    pool: u64,
}

/// Pages that lost a right, with the entry flags they had.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lost {
    pub start: u64,
    pub end: u64,
    pub before: u64,
    /// Not present any more (rather than present with fewer rights).
    pub unmapped: bool,
}

/// What `PageTables::sync` changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub lost: Vec<Lost>,
    /// Pages that became present, with their new entry flags.
    pub mapped: Vec<(u64, u64, u64)>,
}

impl Changes {
    /// Merges adjacent pages that changed alike.
    fn coalesce(&mut self) {
        let mut lost: Vec<Lost> = Vec::with_capacity(self.lost.len());
        for l in self.lost.drain(..) {
            match lost.last_mut() {
                Some(p) if p.end == l.start && p.before == l.before && p.unmapped == l.unmapped => {
                    p.end = l.end
                }
                _ => lost.push(l),
            }
        }
        self.lost = lost;
        let mut mapped: Vec<(u64, u64, u64)> = Vec::with_capacity(self.mapped.len());
        for m in self.mapped.drain(..) {
            match mapped.last_mut() {
                Some(p) if p.1 == m.0 && p.2 == m.2 => p.1 = m.1,
                _ => mapped.push(m),
            }
        }
        self.mapped = mapped;
    }
}

/// What an entry lets the program do with a page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rights {
    write: bool,
    execute: bool,
}

impl PageTables {
    /// The tables for `ram_size` bytes of RAM (a multiple of 2 MiB).
    pub fn for_ram(ram_size: u64) -> PageTables {
        let regions = ram_size / HUGE_PAGE_SIZE;
        let pool_bytes = (regions * PAGE_SIZE).div_ceil(HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE;
        PageTables {
            ram_size,
            pool: ram_size - pool_bytes,
        }
    }

    /// One past the highest address the program may use: the table pool follows.
    pub fn user_end(&self) -> u64 {
        self.pool
    }

    /// The page directory entry of 2 MiB region `region`.
    fn directory_entry(region: u64) -> u64 {
        PAGE_DIRECTORIES + (region / ENTRIES) * PAGE_SIZE + (region % ENTRIES) * 8
    }

    /// The 4 KiB table of region `region`.
    fn table_of(&self, region: u64) -> u64 {
        if region == 0 {
            LOW_PAGE_TABLE
        } else {
            self.pool + region * PAGE_SIZE
        }
    }

    /// Writes the top levels: the PML4 entry, one PDPT entry and an empty directory per GiB,
    /// with region 0 pointing at `LOW_PAGE_TABLE`. The caller fills that table's system
    /// entries; the program's entries come from `sync`.
    pub fn build_fixed(&self, ram: &GuestRam) -> Result<(), OutOfBounds> {
        ram.write(PML4, &(PDPT | TABLE).to_le_bytes())?;
        for gib in 0..self.ram_size.div_ceil(ONE_GIB) {
            let directory = PAGE_DIRECTORIES + gib * PAGE_SIZE;
            ram.write(PDPT + gib * 8, &(directory | TABLE).to_le_bytes())?;
            ram.write(directory, &[0u8; PAGE_SIZE as usize])?;
        }
        ram.write(
            Self::directory_entry(0),
            &(LOW_PAGE_TABLE | TABLE).to_le_bytes(),
        )
    }

    /// Rewrites the entries of every 2 MiB region overlapping `[start, end)` (the program's
    /// part only) from the mappings in `mm`, and says which pages changed how: those that
    /// lost a right (present, write or execute), which KVM may still allow until their host
    /// mapping changes, and those that became present.
    pub fn sync(
        &self,
        ram: &GuestRam,
        mm: &AddressSpace,
        start: u64,
        end: u64,
    ) -> Result<Changes, OutOfBounds> {
        let user_start = mm.layout().user_start;
        let end = end.min(self.pool);
        let mut changes = Changes::default();
        if start >= end {
            return Ok(changes);
        }
        for region in start / HUGE_PAGE_SIZE..end.div_ceil(HUGE_PAGE_SIZE) {
            let base = region * HUGE_PAGE_SIZE;
            let wanted = wanted_entries(mm, base, user_start.max(base));
            let old = self.current_entries(ram, region)?;
            for (i, (&before, &after)) in old.iter().zip(&wanted).enumerate() {
                let page = base + i as u64 * PAGE_SIZE;
                if page < user_start {
                    continue;
                }
                if loses_rights(before, after) {
                    changes.lost.push(Lost {
                        start: page,
                        end: page + PAGE_SIZE,
                        before: flags(before),
                        unmapped: after & PRESENT == 0,
                    });
                } else if before & PRESENT == 0 && after & PRESENT != 0 {
                    changes.mapped.push((page, page + PAGE_SIZE, flags(after)));
                }
            }
            self.write_region(ram, region, base, user_start, &wanted)?;
        }
        changes.coalesce();
        Ok(changes)
    }

    /// The 512 page entries region `region` has now, huge entries spelled out per page
    /// (0 for pages the program cannot reach).
    fn current_entries(&self, ram: &GuestRam, region: u64) -> Result<Vec<u64>, OutOfBounds> {
        let pde = read_u64(ram, Self::directory_entry(region))?;
        let base = region * HUGE_PAGE_SIZE;
        if pde & PRESENT == 0 {
            return Ok(vec![0; ENTRIES as usize]);
        }
        if pde & HUGE != 0 {
            return Ok((0..ENTRIES)
                .map(|i| (pde & !HUGE) | (base + i * PAGE_SIZE))
                .collect());
        }
        let mut raw = vec![0u8; PAGE_SIZE as usize];
        ram.read(self.table_of(region), &mut raw)?;
        Ok(raw
            .chunks_exact(8)
            .map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes")))
            .collect())
    }

    fn write_region(
        &self,
        ram: &GuestRam,
        region: u64,
        base: u64,
        user_start: u64,
        wanted: &[u64],
    ) -> Result<(), OutOfBounds> {
        let directory = Self::directory_entry(region);
        let table = self.table_of(region);
        if region == 0 {
            // The system area's entries stay as the VMM wrote them.
            let first = (user_start / PAGE_SIZE) as usize;
            return write_entries(ram, table + first as u64 * 8, &wanted[first..]);
        }
        let uniform = wanted.iter().all(|&e| flags(e) == flags(wanted[0]));
        if uniform && wanted[0] == 0 {
            return ram.write(directory, &0u64.to_le_bytes());
        }
        if uniform {
            let entry = finished(base | flags(wanted[0]) | HUGE);
            return ram.write(directory, &entry.to_le_bytes());
        }
        write_entries(ram, table, wanted)?;
        ram.write(directory, &(table | TABLE).to_le_bytes())
    }
}

impl PageTables {
    /// Rewrites the high window's tables (see `high`): the top-level entry, then every page
    /// of the window's tables whole, from the mappings. Whole, because a table page may be
    /// fresh (not yet zeroed) and nothing may ever link one whose entries came from
    /// anything but the mappings; the window's tables are few. Pages that lose a right are
    /// the caller's to make KVM forget (`HighChange`): their backing was replaced or is
    /// invalidated.
    pub fn sync_high(&self, ram: &GuestRam, mm: &AddressSpace) -> Result<(), OutOfBounds> {
        use crate::high::{HIGH_START, TableKey};
        let high = mm.high();
        let Some(pointers) = high.table(TableKey::Pointers) else {
            return Ok(());
        };
        let linked = |key: TableKey| high.table(key).map_or(0, |page| page | TABLE);
        for (key, page) in high.tables() {
            match key {
                TableKey::Pointers => {
                    let entries: Vec<u64> = (0..ENTRIES)
                        .map(|gib| linked(TableKey::Directory(gib)))
                        .collect();
                    write_raw(ram, page, &entries)?;
                }
                TableKey::Directory(gib) => {
                    let entries: Vec<u64> = (0..ENTRIES)
                        .map(|r| linked(TableKey::Table(gib * ENTRIES + r)))
                        .collect();
                    write_raw(ram, page, &entries)?;
                }
                TableKey::Table(region) => {
                    write_entries(ram, page, &high.region_pages(region, entry_bits))?;
                }
            }
        }
        // Linked last, once everything under it is written.
        ram.write(
            PML4 + (HIGH_START >> 39) * 8,
            &(pointers | TABLE).to_le_bytes(),
        )
    }
}

/// Writes table entries as they are (upper levels: no accessed or dirty bits).
fn write_raw(ram: &GuestRam, at: u64, entries: &[u64]) -> Result<(), OutOfBounds> {
    let bytes: Vec<u8> = entries.iter().flat_map(|e| e.to_le_bytes()).collect();
    ram.write(at, &bytes)
}

/// The entry each page of the region at `base` should have (pages below `from` excluded:
/// they are the system area's).
fn wanted_entries(mm: &AddressSpace, base: u64, from: u64) -> Vec<u64> {
    let mut entries = vec![0u64; ENTRIES as usize];
    let end = base + HUGE_PAGE_SIZE;
    for vma in mm.vmas_in(from, end) {
        let bits = entry_bits(vma.prot);
        let (lo, hi) = (vma.start.max(from), vma.end.min(end));
        for page in (lo..hi).step_by(PAGE_SIZE as usize) {
            entries[((page - base) / PAGE_SIZE) as usize] = if bits == 0 { 0 } else { page | bits };
        }
    }
    entries
}

/// Entry flags for a mapping's `PROT_*` bits (x86 has no write-only or execute-only
/// pages: any access right makes the page readable).
fn entry_bits(prot: u32) -> u64 {
    let prot = prot as i32;
    if prot & (libc::PROT_READ | libc::PROT_WRITE | libc::PROT_EXEC) == 0 {
        return 0;
    }
    let mut bits = PRESENT | USER;
    if prot & libc::PROT_WRITE != 0 {
        bits |= WRITABLE;
    }
    if prot & libc::PROT_EXEC == 0 {
        bits |= NO_EXECUTE;
    }
    bits
}

/// An entry's permission bits, without its address and the bits the CPU sets.
fn flags(entry: u64) -> u64 {
    entry & (PRESENT | WRITABLE | USER | NO_EXECUTE)
}

fn rights(entry: u64) -> Option<Rights> {
    (entry & PRESENT != 0).then_some(Rights {
        write: entry & WRITABLE != 0,
        execute: entry & NO_EXECUTE == 0,
    })
}

/// Whether going from entry `before` to entry `after` takes a right away.
pub fn loses_rights(before: u64, after: u64) -> bool {
    match (rights(before), rights(after)) {
        (None, _) => false,
        (Some(_), None) => true,
        (Some(b), Some(a)) => (b.write && !a.write) || (b.execute && !a.execute),
    }
}

fn read_u64(ram: &GuestRam, addr: u64) -> Result<u64, OutOfBounds> {
    let mut b = [0u8; 8];
    ram.read(addr, &mut b)?;
    Ok(u64::from_le_bytes(b))
}

/// An entry as written: present ones already accessed and dirty. KVM's shadow MMU only
/// prefetches neighbours of accessed entries (eight pages per fault instead of one), and
/// maps a clean writable page read-only until a second fault sets its dirty bit.
fn finished(entry: u64) -> u64 {
    if entry & PRESENT == 0 {
        entry
    } else {
        entry | ACCESSED | DIRTY
    }
}

fn write_entries(ram: &GuestRam, at: u64, entries: &[u64]) -> Result<(), OutOfBounds> {
    let bytes: Vec<u8> = entries
        .iter()
        .flat_map(|&e| finished(e).to_le_bytes())
        .collect();
    ram.write(at, &bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mm::{Layout, Vma, VmaKind};

    const MIB: u64 = 1 << 20;
    const RW: u32 = (libc::PROT_READ | libc::PROT_WRITE) as u32;
    const RX: u32 = (libc::PROT_READ | libc::PROT_EXEC) as u32;

    fn setup() -> (GuestRam, PageTables, AddressSpace) {
        let ram = GuestRam::anonymous(64 * MIB).unwrap();
        let tables = PageTables::for_ram(ram.size());
        tables.build_fixed(&ram).unwrap();
        let layout = Layout {
            user_start: MIB,
            user_end: tables.user_end(),
            stack_size: 8 * MIB,
        };
        (ram, tables, AddressSpace::new(layout, u64::MAX))
    }

    /// What the tables say about `addr`: its entry with the address and CPU bits masked.
    fn lookup(ram: &GuestRam, tables: &PageTables, addr: u64) -> u64 {
        let region = addr / HUGE_PAGE_SIZE;
        let pde = read_u64(ram, PageTables::directory_entry(region)).unwrap();
        if pde & PRESENT == 0 {
            return 0;
        }
        if pde & HUGE != 0 {
            return flags(pde) | HUGE;
        }
        let index = (addr % HUGE_PAGE_SIZE) / PAGE_SIZE;
        flags(read_u64(ram, tables.table_of(region) + index * 8).unwrap())
    }

    /// Syncs everything; returns the ranges that lost a right.
    fn sync_all(ram: &GuestRam, tables: &PageTables, mm: &AddressSpace) -> Vec<(u64, u64)> {
        let changes = tables.sync(ram, mm, 0, tables.user_end()).unwrap();
        let mut lost: Vec<(u64, u64)> = Vec::new();
        for l in changes.lost {
            match lost.last_mut() {
                Some((_, e)) if *e == l.start => *e = l.end,
                _ => lost.push((l.start, l.end)),
            }
        }
        lost
    }

    #[test]
    fn whole_regions_are_huge_pages_and_parts_get_tables() {
        let (ram, tables, mut mm) = setup();
        mm.map_fixed(Vma::anonymous(4 * MIB, 8 * MIB, RW, VmaKind::Anonymous))
            .unwrap();
        mm.map_fixed(Vma::anonymous(
            8 * MIB,
            8 * MIB + 3 * PAGE_SIZE,
            RX,
            VmaKind::File,
        ))
        .unwrap();
        sync_all(&ram, &tables, &mm);
        assert_eq!(
            lookup(&ram, &tables, 5 * MIB),
            PRESENT | USER | WRITABLE | NO_EXECUTE | HUGE
        );
        assert_eq!(lookup(&ram, &tables, 8 * MIB + PAGE_SIZE), PRESENT | USER);
        assert_eq!(
            lookup(&ram, &tables, 8 * MIB + 3 * PAGE_SIZE),
            0,
            "past the mapping"
        );
        assert_eq!(lookup(&ram, &tables, 2 * MIB), 0, "never mapped");
        // The pool of tables is outside the program's reach.
        assert!(mm.vmas().all(|v| v.end <= tables.user_end()));
    }

    #[test]
    fn lost_rights_are_reported_gained_ones_are_not() {
        let (ram, tables, mut mm) = setup();
        mm.map_fixed(Vma::anonymous(4 * MIB, 6 * MIB, RW, VmaKind::Anonymous))
            .unwrap();
        sync_all(&ram, &tables, &mm);
        // Read-only for one page of a huge region: the region splits, one page lost W.
        mm.protect(4 * MIB + PAGE_SIZE, PAGE_SIZE, libc::PROT_READ as u32)
            .unwrap();
        let lost = sync_all(&ram, &tables, &mm);
        assert_eq!(lost, [(4 * MIB + PAGE_SIZE, 4 * MIB + 2 * PAGE_SIZE)]);
        assert_eq!(
            lookup(&ram, &tables, 4 * MIB + PAGE_SIZE),
            PRESENT | USER | NO_EXECUTE
        );
        assert_eq!(
            lookup(&ram, &tables, 4 * MIB),
            PRESENT | USER | WRITABLE | NO_EXECUTE
        );
        // Writable again: nothing lost. Unmapped: all of it lost.
        mm.protect(4 * MIB + PAGE_SIZE, PAGE_SIZE, RW).unwrap();
        assert!(sync_all(&ram, &tables, &mm).is_empty());
        mm.unmap(4 * MIB, 2 * MIB).unwrap();
        assert_eq!(sync_all(&ram, &tables, &mm), [(4 * MIB, 6 * MIB)]);
        assert_eq!(lookup(&ram, &tables, 5 * MIB), 0);
    }

    #[test]
    fn prot_none_is_not_present_and_the_system_area_is_left_alone() {
        let (ram, tables, mut mm) = setup();
        ram.write(
            LOW_PAGE_TABLE + 0x10 * 8,
            &(0x10_000 | PRESENT | USER).to_le_bytes(),
        )
        .unwrap();
        mm.map_fixed(Vma::anonymous(
            MIB,
            MIB + 2 * PAGE_SIZE,
            0,
            VmaKind::Anonymous,
        ))
        .unwrap();
        mm.map_fixed(Vma::anonymous(
            MIB + 2 * PAGE_SIZE,
            2 * MIB,
            RW,
            VmaKind::Anonymous,
        ))
        .unwrap();
        sync_all(&ram, &tables, &mm);
        assert_eq!(lookup(&ram, &tables, MIB), 0, "PROT_NONE");
        assert_eq!(
            lookup(&ram, &tables, MIB + 2 * PAGE_SIZE) & WRITABLE,
            WRITABLE
        );
        assert_eq!(
            lookup(&ram, &tables, 0x10_000),
            PRESENT | USER,
            "system entry kept"
        );
    }
}
