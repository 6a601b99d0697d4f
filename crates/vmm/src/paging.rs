//! Identity-mapping page tables, built once per template and never edited afterwards.
//!
//! 2 MiB pages cover RAM, except the first 2 MiB, which a 4 KiB table splits into: a
//! not-present NULL guard, the read-only system area (tables and stubs), the writable ring-0
//! exception stack, and the program's pages.
//!
//! The system area must be user-accessible: kvm_pvm runs emulated ring-0 code with user-mode
//! page permissions (a fetch of the stub from a supervisor page faults). It is read-only, so
//! the program cannot rewrite tables or stubs; and even a guest that could would only control
//! its own VM, whose every exit the VMM validates.

use forkvm_kernel::memory::{GuestRam, OutOfBounds};

use crate::layout::{
    LOW_PAGE_TABLE, NULL_GUARD_END, PAGE_DIRECTORIES, PDPT, PML4, RING0_STACK_BOTTOM,
    RING0_STACK_TOP, USER_START,
};

const PRESENT: u64 = 1 << 0;
const WRITABLE: u64 = 1 << 1;
const USER: u64 = 1 << 2;
const HUGE: u64 = 1 << 7;
const TWO_MIB: u64 = 2 << 20;
const ONE_GIB: u64 = 1 << 30;

/// Writes the page tables for `ram` into its system area.
///
/// The caller guarantees `ram.size()` is a multiple of 2 MiB and at most `layout::MAX_RAM`.
pub fn build_identity_map(ram: &GuestRam) -> Result<(), OutOfBounds> {
    let size = ram.size();
    let table_flags = PRESENT | WRITABLE | USER;
    ram.write(PML4, &(PDPT | table_flags).to_le_bytes())?;

    let gib_count = size.div_ceil(ONE_GIB);
    for gib in 0..gib_count {
        let directory = PAGE_DIRECTORIES + gib * 4096;
        ram.write(PDPT + gib * 8, &(directory | table_flags).to_le_bytes())?;
        let mut entries = vec![0u8; 4096];
        for (i, entry) in entries.chunks_exact_mut(8).enumerate() {
            let addr = gib * ONE_GIB + i as u64 * TWO_MIB;
            let value = if addr >= size {
                0
            } else if addr == 0 {
                LOW_PAGE_TABLE | table_flags
            } else {
                addr | PRESENT | WRITABLE | USER | HUGE
            };
            entry.copy_from_slice(&value.to_le_bytes());
        }
        ram.write(directory, &entries)?;
    }

    let mut low = vec![0u8; 4096];
    for (i, entry) in low.chunks_exact_mut(8).enumerate() {
        let addr = i as u64 * 4096;
        let value = if addr < NULL_GUARD_END {
            0
        } else if (RING0_STACK_BOTTOM..RING0_STACK_TOP).contains(&addr) {
            addr | PRESENT | WRITABLE | USER
        } else if addr < USER_START {
            addr | PRESENT | USER
        } else {
            addr | PRESENT | WRITABLE | USER
        };
        entry.copy_from_slice(&value.to_le_bytes());
    }
    ram.write(LOW_PAGE_TABLE, &low)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(ram: &GuestRam, addr: u64) -> u64 {
        let mut b = [0u8; 8];
        ram.read(addr, &mut b).unwrap();
        u64::from_le_bytes(b)
    }

    #[test]
    fn maps_ram_and_guards() {
        let ram = GuestRam::anonymous(6 * TWO_MIB).unwrap();
        build_identity_map(&ram).unwrap();
        assert_eq!(entry(&ram, PML4) & !0xfff, PDPT);
        assert_eq!(entry(&ram, PDPT) & !0xfff, PAGE_DIRECTORIES);
        // Second 2 MiB page: user, huge.
        assert_eq!(
            entry(&ram, PAGE_DIRECTORIES + 8),
            TWO_MIB | PRESENT | WRITABLE | USER | HUGE
        );
        // Beyond RAM: not present.
        assert_eq!(entry(&ram, PAGE_DIRECTORIES + 6 * 8), 0);
        // NULL guard not present; system area read-only; ring-0 stack and user memory
        // writable.
        assert_eq!(entry(&ram, LOW_PAGE_TABLE), 0);
        assert_eq!(entry(&ram, LOW_PAGE_TABLE + 16 * 8) & WRITABLE, 0);
        assert_ne!(entry(&ram, LOW_PAGE_TABLE + 0x1f * 8) & WRITABLE, 0);
        assert_ne!(entry(&ram, LOW_PAGE_TABLE + 256 * 8) & USER, 0);
    }
}
